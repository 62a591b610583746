"""Outlier detectors: pure functions on tensors (no hooks, no model, no I/O).

Every detector takes an activation matrix ``A`` of shape [tokens, channels] (one
sequence at one point of the network; a leading batch dimension is accepted where
noted) or a weight matrix, and thresholds from :class:`Thresholds`.

Definitions (and the papers they come from):

- *massive activation* (Raman et al. 2025, lecture notes): an element with
  ``|A_ij| > eta * mean(|A|)`` and ``|A_ij| > gamma`` (eta=300, gamma=50).
- *massive activation, Sun et al. 2024 rule*: magnitude above 100 and about 1000x the
  median magnitude of its hidden state.
- *channel-wise outlier*: see :func:`channel_outliers`.
- *LLM.int8() outlier feature* (Dettmers et al. 2022): see :class:`Int8FeatureTracker`.
- *super weight* (Yu et al. 2024): see :func:`super_weight_candidate`.
- *difficulty*: effective int8 levels per channel under a per-tensor scale, max/median
  ratio, kurtosis (:func:`difficulty`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError


@dataclass(kw_only=True, frozen=True)
class Thresholds:
    massive_eta: float = 300.0  # |A_ij| > eta * mean(|A|)
    massive_gamma: float = 50.0  # |A_ij| > gamma
    sun_min: float = 100.0  # Sun et al.: magnitude above this ...
    sun_ratio: float = 1000.0  # ... and at least this times the median magnitude
    channel_eta: float = 3.0  # |mean(A_i)| > eta * std(A) + mean(|A|)
    channel_beta: float = 0.6  # std(A_i) < beta
    int8_magnitude: float = 6.0  # LLM.int8(): |value| >= 6 ...
    int8_layer_frac: float = 0.25  # ... in at least 25% of the layers ...
    int8_seq_frac: float = 0.06  # ... and at least 6% of the sequence positions
    sw_spike_factor: float = 20.0  # a down_proj output spike: max >= factor * median over layers
    sw_min: float = 100.0  # ... and >= this magnitude
    sw_stop_ratio: float = 0.3  # stop when the largest down_proj output < ratio * the first one
    sw_max_iters: int = 6

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) or v < 0:
                raise UserError(f"threshold {k} must be a non-negative number, got {v!r}")
        for k in ("int8_layer_frac", "int8_seq_frac", "sw_stop_ratio"):
            if getattr(self, k) > 1:
                raise UserError(f"threshold {k} is a fraction in [0, 1], got {getattr(self, k)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = Thresholds()


def _matrix(a: torch.Tensor, name: str = "A") -> torch.Tensor:
    if a.dim() < 2:
        raise UserError(f"{name} must be [tokens, channels] (or [batch, tokens, channels]), got shape {tuple(a.shape)}")
    return a.float()


# ---------------------------------------------------------------- massive activations


def massive_mask(a: torch.Tensor, eta: float = DEFAULT.massive_eta, gamma: float = DEFAULT.massive_gamma) -> torch.Tensor:
    """Elements with ``|A_ij| > eta * mean(|A|)`` and ``|A_ij| > gamma``.

    ``a``: [tokens, channels] or [batch, tokens, channels]; with a batch dimension each
    sequence is its own matrix A (its own mean(|A|)). Magnitudes are used, so a large
    negative value counts as well as a large positive one.
    """
    a = _matrix(a).abs()
    mean = a.mean(dim=(-2, -1), keepdim=True)
    return (a > eta * mean) & (a > gamma)


def sun_mask(a: torch.Tensor, min_abs: float = DEFAULT.sun_min, ratio: float = DEFAULT.sun_ratio) -> torch.Tensor:
    """Sun et al.: magnitude > ``min_abs`` and >= ``ratio`` x the median magnitude of the hidden state.

    The hidden state is the whole matrix of one sequence at one layer (its median |A|),
    which is how the paper's figures read ("about 10,000x the median" of a layer's
    output). ``a``: [tokens, channels] or [batch, tokens, channels].
    """
    a = _matrix(a).abs()
    med = a.flatten(-2).median(dim=-1).values[..., None, None]
    return (a > min_abs) & (a >= ratio * med)


def massive_activations(a: torch.Tensor, eta: float = DEFAULT.massive_eta, gamma: float = DEFAULT.massive_gamma) -> list[tuple[int, int, float]]:
    """(token, channel, value) of every massive activation of one matrix, largest first."""
    a = _matrix(a)
    if a.dim() != 2:
        raise UserError(f"massive_activations takes one [tokens, channels] matrix, got shape {tuple(a.shape)}")
    idx = massive_mask(a, eta, gamma).nonzero().tolist()
    out = [(t, c, float(a[t, c])) for t, c in idx]
    return sorted(out, key=lambda r: -abs(r[2]))


# ---------------------------------------------------------------- channel-wise outliers


def channel_outliers(a: torch.Tensor, eta: float = DEFAULT.channel_eta, beta: float = DEFAULT.channel_beta) -> torch.Tensor:
    """Boolean mask over channels: channel-wise outliers of the matrix ``A`` [tokens, channels].

    The seeds (lecture "Types of Outlier") define a channel-wise outlier as a channel i with

        mean(A_i) > eta * std(A) + mean(|A|)   and   std(A_i) < beta   (eta=3, beta=0.6)

    Our reading: ``A_i`` is column i of A (channel i over the tokens of one sequence);
    ``std(A)`` and ``mean(|A|)`` are over every element of A. The first condition says
    the channel sits, on average over the tokens, far from the bulk of the tensor
    (more than eta standard deviations above its mean magnitude); the second says it
    does so *consistently*: small spread over tokens (the "outliers have small
    variance" of Bondarenko et al., the systematic channels of LLM.int8()). We compare
    ``|mean(A_i)|``: a channel constantly at -40 is as hard to quantize as one at +40,
    and the slides' figures plot magnitudes. ``std`` is the population standard
    deviation. ``beta`` is absolute, in the units of A, as in the seeds (their CLIP
    activations are of order one); with a leading batch dimension the rule is applied
    to each sequence and the result is [batch, channels].
    """
    a = _matrix(a)
    mean_i = a.mean(dim=-2)
    std_i = a.std(dim=-2, correction=0)
    std_all = a.flatten(-2).std(dim=-1, correction=0)[..., None]
    mean_abs = a.abs().flatten(-2).mean(dim=-1)[..., None]
    return (mean_i.abs() > eta * std_all + mean_abs) & (std_i < beta)


# ---------------------------------------------------------------- LLM.int8() outlier features


class Int8FeatureTracker:
    """LLM.int8() outlier features, accumulated layer by layer in bounded memory.

    Dettmers et al. track each hidden dimension h_i across the hidden states X_l
    (l = 0..L) and call it an outlier feature when its magnitude reaches 6 (here
    ``magnitude``), this happens in at least 25% of the layers (``layer_frac``) and in
    at least 6% of the sequence positions (``seq_frac``). Our reading: a dimension
    *affects a layer* when it has at least one |value| >= 6 there; it *affects a
    sequence position* s when |X_l[s, i]| >= 6 in any tracked layer; the fractions are
    over the layers fed to the tracker and over every (sequence, position) seen.

    Memory: a [layers, channels] count and one [positions, channels] boolean union.
    """

    def __init__(self, channels: int, magnitude: float = DEFAULT.int8_magnitude):
        self.channels = channels
        self.magnitude = magnitude
        self.layer_hits: dict[object, torch.Tensor] = {}  # layer key -> [C] positions with a hit
        self._union: list[torch.Tensor] = []  # per batch offset: [positions, C] bool
        self._offsets: dict[tuple, int] = {}

    def update(self, layer, x: torch.Tensor, batch_key: int = 0) -> None:
        """Add a hidden state ``x`` [batch, tokens, C] (or [tokens, C]) of ``layer``.

        ``batch_key`` identifies the batch of sequences: the same key for the same
        sequences seen at different layers (their positions are the same positions).
        """
        if x.dim() == 2:
            x = x[None]
        if x.shape[-1] != self.channels:
            raise UserError(f"hidden state has {x.shape[-1]} channels, tracker expects {self.channels}")
        hit = x.detach().abs().reshape(-1, self.channels) >= self.magnitude  # [B*T, C]
        cnt = hit.sum(0)
        prev = self.layer_hits.get(layer)
        self.layer_hits[layer] = cnt if prev is None else prev + cnt
        key = (batch_key, hit.shape[0])
        if key not in self._offsets:
            self._offsets[key] = len(self._union)
            self._union.append(hit.clone())
        else:
            self._union[self._offsets[key]] |= hit

    @property
    def n_layers(self) -> int:
        return len(self.layer_hits)

    @property
    def n_positions(self) -> int:
        return sum(u.shape[0] for u in self._union)

    def summary(self) -> dict[str, torch.Tensor]:
        """Per channel: fraction of layers affected, fraction of positions affected, hit count."""
        if not self.layer_hits:
            z = torch.zeros(self.channels)
            return {"layer_frac": z, "seq_frac": z, "hits": z.long()}
        hits = torch.stack(list(self.layer_hits.values()))  # [L, C]
        union = torch.cat(self._union).sum(0) if self._union else torch.zeros(self.channels)
        return {
            "layer_frac": (hits > 0).float().mean(0),
            "seq_frac": union.float() / max(self.n_positions, 1),
            "hits": hits.sum(0),
        }

    def features(self, layer_frac: float = DEFAULT.int8_layer_frac, seq_frac: float = DEFAULT.int8_seq_frac) -> list[int]:
        """The outlier feature dimensions, most frequent first."""
        s = self.summary()
        ok = (s["layer_frac"] >= layer_frac) & (s["seq_frac"] >= seq_frac) & (s["hits"] > 0)
        dims = ok.nonzero().flatten().tolist()
        return sorted(dims, key=lambda c: -int(s["hits"][c]))

    def ranking(self) -> list[int]:
        """Every dimension with at least one hit, by hit count (ties: by layer fraction)."""
        s = self.summary()
        dims = (s["hits"] > 0).nonzero().flatten().tolist()
        return sorted(dims, key=lambda c: (-int(s["hits"][c]), -float(s["layer_frac"][c])))


def int8_outlier_features(
    hidden_states: Sequence[torch.Tensor],
    magnitude: float = DEFAULT.int8_magnitude,
    layer_frac: float = DEFAULT.int8_layer_frac,
    seq_frac: float = DEFAULT.int8_seq_frac,
) -> list[int]:
    """LLM.int8() outlier feature dimensions of ``hidden_states`` (one [tokens, C] or
    [batch, tokens, C] tensor per layer, the same sequences in each)."""
    if not hidden_states:
        return []
    tr = Int8FeatureTracker(hidden_states[0].shape[-1], magnitude)
    for layer, x in enumerate(hidden_states):
        tr.update(layer, x)
    return tr.features(layer_frac, seq_frac)


# ---------------------------------------------------------------- super weights


@dataclass(kw_only=True)
class SuperWeightCandidate:
    token: int  # position of the output spike
    row: int  # output channel of the spike (row of W)
    col: int  # input channel of the spike (column of W)
    output: float  # Y[token, row]
    input: float  # X[token, col]
    weight: float  # W[row, col]
    share: float  # X[token, col] * W[row, col] / Y[token, row]


def super_weight_candidate(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, exclude: Iterable[tuple[int, int]] = ()) -> SuperWeightCandidate:
    """The super weight suggested by the spikes of a down projection Y = X W^T.

    ``x`` [tokens, H] input, ``y`` [tokens, D] output, ``w`` [D, H]. The output spike
    (largest |Y_tj|) gives the row j and the token t; the input spike of that token
    (largest |X_tk|) gives the column k (Yu et al.: Y_tj is dominated by X_tk W_jk when
    both are outliers). Coordinates in ``exclude`` (already removed) are skipped.
    """
    x, y, w = x.float(), y.float(), w.float()
    if x.dim() != 2 or y.dim() != 2 or w.shape != (y.shape[1], x.shape[1]) or x.shape[0] != y.shape[0]:
        raise UserError(f"super_weight_candidate: shapes x {tuple(x.shape)}, y {tuple(y.shape)}, w {tuple(w.shape)} do not fit Y = X W^T")
    t, j = divmod(int(y.abs().argmax()), y.shape[1])
    mag = x[t].abs().clone()
    for r, c in exclude:
        if r == j:
            mag[c] = -1
    k = int(mag.argmax())
    out = float(y[t, j])
    contrib = float(x[t, k] * w[j, k])
    return SuperWeightCandidate(token=t, row=j, col=k, output=out, input=float(x[t, k]), weight=float(w[j, k]), share=contrib / out if out else 0.0)


def spike(values: Sequence[float] | torch.Tensor, factor: float = DEFAULT.sw_spike_factor, min_abs: float = DEFAULT.sw_min) -> int | None:
    """Index of the largest value if it is a spike (>= factor x the median and >= min_abs), else None."""
    v = torch.as_tensor(values, dtype=torch.float64).abs()
    if v.numel() == 0:
        return None
    i = int(v.argmax())
    med = float(v.median())
    return i if v[i] >= min_abs and v[i] >= factor * med else None


# ---------------------------------------------------------------- difficulty


def effective_levels(channel_max: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Levels a channel really uses when the tensor shares one scale: 2^bits * m_i / m."""
    m = channel_max.float().abs()
    top = m.max()
    if top <= 0:
        return torch.zeros_like(m)
    return (2**bits) * m / top


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis E[(x-mu)^4] / sigma^4 of all elements (3 for a Gaussian)."""
    x = x.double().flatten()
    n = x.numel()
    return kurtosis_from_moments(n, x.sum(), (x * x).sum(), (x**3).sum(), (x**4).sum())


def kurtosis_from_moments(n, s1, s2, s3, s4) -> float:
    """Pearson kurtosis from the power sums sum x^k (k = 1..4) of n values."""
    n = float(n)
    if n < 2:
        return float("nan")
    m1, m2, m3, m4 = (float(s) / n for s in (s1, s2, s3, s4))
    var = m2 - m1 * m1
    if var <= 0:
        return float("nan")
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
    return c4 / (var * var)


def difficulty_from_stats(channel_max: torch.Tensor, median_abs: float, moments: tuple, bits: int = 8) -> dict:
    """Difficulty numbers from summaries: per-channel maxima, median |x|, (n, s1..s4)."""
    eff = effective_levels(channel_max, bits)
    top = float(channel_max.abs().max()) if channel_max.numel() else 0.0
    return {
        "absmax": top,
        "eff_levels_median": float(eff.median()) if eff.numel() else 0.0,
        "eff_levels_min": float(eff.min()) if eff.numel() else 0.0,
        "frac_channels_under_16_levels": float((eff < 16).float().mean()) if eff.numel() else 0.0,
        "max_over_median": top / median_abs if median_abs > 0 else float("inf"),
        "kurtosis": kurtosis_from_moments(*moments),
    }


def difficulty(t: torch.Tensor, channel_dim: int = -1, bits: int = 8) -> dict:
    """Difficulty of quantizing ``t`` with one per-tensor scale.

    Channels are slices along ``channel_dim`` (activations [tokens, C]: the last
    dimension; weights [out, in]: ``channel_dim=0`` gives per-output-row channels, the
    usual per-channel quantization axis). Returns the effective int``bits`` levels per
    channel (2^bits * m_i / m: median, minimum, share of channels under 16 levels,
    i.e. under 4 bits' worth), max|t| / median|t|, and the Pearson kurtosis.
    """
    t = t.detach().float()
    a = t.abs()
    dim = channel_dim % t.dim()
    reduce = [d for d in range(t.dim()) if d != dim]
    ch_max = a.amax(dim=reduce) if reduce else a
    x = t.flatten()
    x2 = x * x
    f64 = torch.float64
    moments = (x.numel(), x.sum(dtype=f64), x2.sum(dtype=f64), (x2 * x).sum(dtype=f64), (x2 * x2).sum(dtype=f64))
    return difficulty_from_stats(ch_max, float(a.flatten().median()), moments, bits)
