"""Online rotations: orthogonal transforms applied to activations at run time.

Rotation methods fold most transforms into weights offline, but a transform that meets a
non-linearity on its way cannot be folded: LN(A W R) != LN(A W) R, and the input of the
MLP down projection is act(gate(x)) * up(x). There the transform ``x -> x @ M.T`` is
computed at run time and ``M.T`` folded into the weight of the linear that reads it
(``W' = W @ M.T``, so ``x' W'^T = x W^T``).

:class:`OnlineRotation` holds one such transform:
- ``hadamard``: the normalized Hadamard matrix of the size, applied through its
  Kronecker structure H_a (x) S_b as two small matrix products
  (``transform.hadamard.hadamard_transform``; O(n (a + b)), no n x n matrix);
- ``dense``: any orthogonal matrix (learned or random), a matmul;
- ``blocks``: DuQuant's block-diagonal rotation, a permutation, a second block-diagonal
  rotation (two batched b x b matmuls and a gather).

Attachment points (all keep parameter names unchanged, so checkpoints still load):
- :func:`attach_mlp_input` replaces the MLP's ``forward`` on that instance by
  ``down(R(act(gate(x)) * up(x)))`` with ``R`` registered as the sub-module
  ``llmpress_down_in`` (structure read from the arch table; whatever sits at
  ``down_proj``, a Linear or an ActQuantLinear, then quantizes the rotated input);
- :func:`attach_output_rotation` adds a forward hook on a module (a norm) that rotates
  its output (gemma3, where post-norms block the residual rotation);
- the attention output (o_proj input) and per-head q/k rotations live in
  :mod:`llmpress.runtime.kv_quant`, inside the attention computation.

Matrices are kept in float64 (cast to the activation dtype when applied) so that the
folded weights and the online transform match to float32 precision. Buffers are
non-persistent: a state dict holds the folded weights only; the packed checkpoint stores
these modules beside it (:mod:`llmpress.runtime.rotation_state`,
:mod:`llmpress.export.runtime_state`) and re-attaches them when loaded.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn as nn

from ..errors import UnsupportedArchitecture
from ..transform.hadamard import hadamard_factor, hadamard_matrix, hadamard_transform, kron_factors


def block_matmul(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., k*b] times the block-diagonal diag(r[0], .., r[k-1]) (r [k, b, b]).

    One batched matmul over the k blocks with all rows of x as its M dimension (a
    broadcast ``x[..., k, 1, b] @ r`` would materialize r once per row).
    """
    k, b, _ = r.shape
    y = x.reshape(-1, k, b).transpose(0, 1)  # [k, rows, b]
    return torch.bmm(y, r.to(x.dtype)).transpose(0, 1).reshape(x.shape)


class OnlineRotation(nn.Module):
    """``forward(x) = x @ M.T`` over the last dim, for an orthogonal M (see module doc)."""

    def __init__(self, n: int, kind: str = "hadamard", matrix: torch.Tensor | None = None, blocks: tuple | None = None):
        super().__init__()
        self.n = n
        self.kind = kind
        if kind == "hadamard":
            if hadamard_factor(n) is None:
                raise ValueError(f"no Hadamard matrix of order {n}; use kind='dense' with an orthogonal matrix")
            ha, sb = kron_factors(n)
            self.register_buffer("ha", ha.float(), persistent=False)
            self.register_buffer("sb", sb.float(), persistent=False)
        elif kind == "dense":
            if matrix is None or matrix.shape != (n, n):
                raise ValueError(f"dense online rotation needs an {n}x{n} matrix")
            self.register_buffer("m", matrix.detach().double().clone(), persistent=False)
        elif kind == "blocks":
            r1, perm, r2 = blocks
            if r1.shape[0] * r1.shape[1] != n or r2.shape[0] * r2.shape[1] != n or perm.numel() != n:
                raise ValueError("block rotation shapes do not match n")
            self.register_buffer("r1", r1.detach().double().clone(), persistent=False)
            self.register_buffer("perm", perm.detach().long().clone(), persistent=False)
            self.register_buffer("r2", r2.detach().double().clone(), persistent=False)
        else:
            raise ValueError(f"online rotation kind {kind!r} unknown")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard":
            return hadamard_transform(x, "kron", (self.ha.to(x.dtype), self.sb.to(x.dtype)))
        if self.kind == "dense":
            return x @ self.m.to(x.dtype).T
        # blocks: x' = ((x R1)[:, perm]) R2, i.e. M^T = R1 P R2
        y = block_matmul(x, self.r1)
        y = y.index_select(-1, self.perm)
        return block_matmul(y, self.r2)

    def matrix(self) -> torch.Tensor:
        """M (float64, n x n) with forward(x) = x @ M.T."""
        if self.kind == "hadamard":
            return _cached_hadamard(self.n)
        if self.kind == "dense":
            return self.m.double()
        return self._matrix_blocks()

    def _matrix_blocks(self) -> torch.Tensor:
        eye = torch.eye(self.n, dtype=torch.float64)
        y = block_matmul(eye, self.r1.double())
        y = y.index_select(-1, self.perm)
        y = block_matmul(y, self.r2.double())
        return y.T.contiguous()  # rows of eye @ M^T = M^T  ->  M = (M^T)^T

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n}

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}"


@functools.lru_cache(maxsize=16)
def _cached_hadamard(n: int) -> torch.Tensor:
    return hadamard_matrix(n)


def fold_input_rotation(linear: nn.Module, rot: torch.Tensor) -> None:
    """Fold M.T into a linear reading x @ M.T: W' = W @ M.T (computed in float64)."""
    w = linear.weight
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    w.data.copy_((w.data.to(cd) @ rot.to(device=w.device, dtype=cd).T).to(w.dtype))


def _mlp_forward(self, x):
    h = self.act_fn(getattr(self, self.llmpress_gate)(x)) * getattr(self, self.llmpress_up)(x)
    return getattr(self, self.llmpress_down)(self.llmpress_down_in(h))


def attach_mlp_input(mlp: nn.Module, gate: str, up: str, down: str, rot: OnlineRotation) -> None:
    """Rotate the input of ``mlp.<down>`` online (gated MLPs: down(act(gate(x)) * up(x)))."""
    for name in (gate, up, down, "act_fn"):
        if not hasattr(mlp, name):
            raise UnsupportedArchitecture(f"{type(mlp).__name__} has no {name!r}: the online down-projection rotation needs a gated MLP")
    mlp.llmpress_gate, mlp.llmpress_up, mlp.llmpress_down = gate, up, down
    mlp.llmpress_down_in = rot
    mlp.forward = types.MethodType(_mlp_forward, mlp)


def detach_mlp_input(mlp: nn.Module) -> None:
    if "forward" in vars(mlp):
        del mlp.forward
    if hasattr(mlp, "llmpress_down_in"):
        del mlp.llmpress_down_in


def attach_output_rotation(module: nn.Module, rot: OnlineRotation, name: str = "llmpress_out_rot"):
    """Rotate ``module``'s output online (a forward hook); returns the hook handle."""
    setattr(module, name, rot)

    def hook(_m, _inp, out):
        return getattr(_m, name)(out)

    return module.register_forward_hook(hook)
