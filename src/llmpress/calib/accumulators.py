"""Statistics of a linear layer's inputs, gathered over calibration batches.

Every accumulator has the same shape: ``add(x)`` with the layer input [..., in_features],
``reduce(group)`` to combine the ranks' partial statistics (data-parallel calibration,
:mod:`llmpress.calib.dist`; nothing on one rank), ``result()`` with the statistic,
``free()`` to drop its buffers. :func:`finish` does the last three in order, where the
statistics are consumed.
"""

from __future__ import annotations

import torch


class Accumulator:
    name = "base"

    def add(self, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def result(self):  # pragma: no cover - interface
        raise NotImplementedError

    def reduce(self, group) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def free(self) -> None:
        for k in list(vars(self)):
            if isinstance(getattr(self, k), torch.Tensor):
                setattr(self, k, None)


def gram(x: torch.Tensor, split_at: int = 768) -> torch.Tensor:
    """``x.T @ x`` for ``x`` [n, d]. Wide inputs (d >= ``split_at``, recursively) are split in two column
    halves and only the upper blocks are multiplied (``A^T A``, ``A^T B``, ``B^T B``; the
    lower block is the transpose): 3/4 of the multiply-adds of one full GEMM, the
    saving the symmetric product allows."""
    d = x.shape[1]
    if d < split_at:
        return x.T @ x
    h = d // 2
    a, b = x[:, :h], x[:, h:]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    out[:h, :h] = gram(a, split_at)
    out[:h, h:] = a.T @ b
    out[h:, :h] = out[:h, h:].T
    out[h:, h:] = gram(b, split_at)
    return out


class HessianAccumulator(Accumulator):
    """H = 2/n * sum_t x_t x_t^T (the layer-wise OBS/GPTQ Hessian of ||W X - W_hat X||^2).

    One GEMM per batch in float32 (or the input's dtype when it is float64); the running
    sum is kept in float64 so long calibration runs do not lose precision.
    """

    name = "hessian"

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.sum += gram(x)  # in the input's precision, summed in float64
        self.n += x.shape[0]

    def reduce(self, group) -> None:
        """Sum over ranks. Each batch's product is float32 and the running sum float64, so the
        terms add exactly in any order unless their magnitudes span more than 2^29: the ranks'
        sum equals the one-process sum (the tests check it bit for bit)."""
        if group.active:
            if self.sum is None:
                raise RuntimeError("Hessian accumulator saw no data on this rank (fewer calibration batches than ranks)")
            group.sum_(self.sum)
            self.n = group.sum_int(self.n)

    def result(self) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("Hessian accumulator saw no data")
        # read once: the running sum is scaled in place and handed over (no float64
        # temporary beside it: 1.6 GB each for a 14336-wide input)
        s, self.sum = self.sum, None
        return s.mul_(2.0 / self.n).float()


class InputChannelStats(Accumulator):
    """Per input channel: L2 norm ||X_j||_2, abs-max max|X_j| and mean |X_j| over tokens."""

    name = "channel_stats"

    def __init__(self):
        self.sq: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self.abssum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        sq = x.pow(2).sum(0, dtype=torch.float64)
        am = a.amax(0)
        s = a.sum(0, dtype=torch.float64)
        if self.sq is None:
            self.sq, self.absmax, self.abssum = sq, am, s
        else:
            self.sq += sq
            torch.maximum(self.absmax, am, out=self.absmax)
            self.abssum += s
        self.n += x.shape[0]

    def reduce(self, group) -> None:
        if group.active:
            if self.sq is None:
                raise RuntimeError("channel statistics accumulator saw no data on this rank (fewer calibration batches than ranks)")
            group.sum_(self.sq)
            group.max_(self.absmax)
            group.sum_(self.abssum)
            self.n = group.sum_int(self.n)

    def result(self) -> dict[str, torch.Tensor]:
        if self.sq is None:
            raise RuntimeError("channel statistics accumulator saw no data")
        return {
            "l2": self.sq.sqrt().float(),
            "absmax": self.absmax.clone(),
            "mean_abs": (self.abssum / self.n).float(),
            "n": self.n,
        }


class TokenAbsMax(Accumulator):
    """Per token: max_j |x_tj| (one value per token row, in order)."""

    name = "token_absmax"

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(x.reshape(-1, x.shape[-1]).abs().amax(-1).float().cpu())

    def reduce(self, group) -> None:
        """Every rank's tokens, in rank order (= batch order: ranks hold contiguous shares)."""
        if group.active:
            self.parts = [p for parts in group.gather(self.parts) for p in parts]

    def result(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.empty(0)

    def free(self) -> None:
        self.parts = []


def finish(accs: dict[str, Accumulator], group) -> dict:
    """Reduce each accumulator over the ranks, read its result, free it (in name order, the
    same on every rank, so the collectives line up)."""
    out = {}
    for k in sorted(accs):
        accs[k].reduce(group)
        out[k] = accs[k].result()
        accs[k].free()
    return out


ACCUMULATORS: dict[str, type[Accumulator]] = {cls.name: cls for cls in (HessianAccumulator, InputChannelStats, TokenAbsMax)}
