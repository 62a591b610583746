"""Hadamard matrices and fast Hadamard transforms (pure tensor functions).

A Hadamard matrix H_n has entries +-1 and H H^T = n I; H / sqrt(n) is orthogonal and
spreads any single large coordinate evenly over all n outputs, which is what rotation
methods (QuaRot) use to remove activation outliers.

Constructions:
- Sylvester: H_{2n} = [[H_n, H_n], [H_n, -H_n]], every power of two. Applied to a vector
  by the fast Walsh-Hadamard transform (n log n additions).
- Paley I: order q + 1 for a prime q = 3 (mod 4) (12 from q=11, 20 from q=19, 44, 48 ...).
- Paley II: order 2(q + 1) for a prime q = 1 (mod 4) (36 from q=17, 28 from q=13 ...).
- Kronecker products: H_a (x) H_b is a Hadamard matrix of order a*b.

Sizes used by the packaged models: 576 = 36 x 16 (SmolLM2 hidden), 1536 = 12 x 128
(SmolLM2 MLP), 640 = 20 x 32 (gemma-3-270m hidden), 64, 256, 1024, 2048 (powers of two).
An order with no construction here (e.g. any n not divisible by 4 beyond 2) falls back to
a random orthogonal matrix (QR of a Gaussian); :func:`orthogonal_matrix` says so in the
log and in the kind it returns, so callers can put it in their report.

Convention: a transform of a row vector x is ``x @ M.T`` (``y_i = sum_j M_ij x_j``);
:func:`hadamard_transform` computes it with ``M = hadamard_matrix(n) / sqrt(n)``, either
by fast Walsh-Hadamard butterflies (:func:`fwht`) or, faster on CPU, as two small matrix
products H_a X S_b with n = a * b (the Kronecker structure of H_n).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger(__name__)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q+1 (q prime, q = 3 mod 4): H = I + S with S the skew conference matrix."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1) (q prime, q = 1 mod 4): from the symmetric conference matrix S."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), float64, entries +-1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def _base_construction(m: int) -> tuple[str, tuple[int, ...]] | None:
    """How to build a Hadamard matrix of order m that is not a power of two, or None."""
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", (m - 1,))
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return ("paley2", (m // 2 - 1,))
    for a in range(12, int(math.isqrt(m)) + 1):
        if m % a == 0 and _buildable(a) and _buildable(m // a):
            return ("kron", (a, m // a))
    return None


def _buildable(m: int) -> bool:
    return m >= 1 and (m & (m - 1) == 0 or _base_construction(m) is not None)


@functools.cache
def hadamard_factor(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k, H_m constructible and m as small as possible; None if none."""
    if n < 1:
        return None
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or _base_construction(m) is not None:
            return (m, p)
        p //= 2
    return None


def has_hadamard(n: int) -> bool:
    return hadamard_factor(n) is not None


@functools.cache
def _hadamard_small(m: int) -> torch.Tensor:
    if m & (m - 1) == 0:
        return sylvester(m)
    how = _base_construction(m)
    if how is None:
        raise ValueError(f"no Hadamard construction of order {m}")
    kind, args = how
    if kind == "paley1":
        return _paley1(args[0])
    if kind == "paley2":
        return _paley2(args[0])
    return torch.kron(_hadamard_small(args[0]), _hadamard_small(args[1]))


def hadamard_matrix(n: int, normalized: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Hadamard matrix of order n = m * 2^k as H_m (x) H_{2^k} (divided by sqrt(n) if normalized)."""
    f = hadamard_factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here (n must be m * 2^k with H_m known)")
    m, p = f
    h = torch.kron(_hadamard_small(m), sylvester(p)) if m > 1 else sylvester(p)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two): x @ H_n."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fast Walsh-Hadamard transform needs a power of two, got {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(shape)


@functools.cache
def kron_split(n: int) -> tuple[int, int]:
    """(a, b) with n = a * b, H_n = H_a (x) S_b (S_b Sylvester), a = m * 2^j as close to sqrt(n) as allowed."""
    f = hadamard_factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    m, p = f
    k = p.bit_length() - 1
    a = min((m * 2**j for j in range(k + 1)), key=lambda a: abs(math.log(a) - math.log(n) / 2))
    return a, n // a


@functools.lru_cache(maxsize=32)
def kron_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized (H_a, S_b) float64 with H_a (x) S_b = hadamard_matrix(n, normalized=False)."""
    a, b = kron_split(n)
    m = hadamard_factor(n)[0]
    ha = torch.kron(_hadamard_small(m), sylvester(a // m)) if m > 1 else sylvester(a)
    return ha, sylvester(b)


def hadamard_transform(x: torch.Tensor, method: str = "kron", factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ H.T with H = hadamard_matrix(n) (normalized), n = x.shape[-1].

    ``method="fwht"``: fast Walsh-Hadamard butterflies on the power-of-two factor and a
    small m x m product (O(n log n + n m) operations, log n passes over memory);
    ``"kron"`` (default): H_a (x) S_b as two small matrix products, X [a, b] -> H_a X S_b
    (O(n (a + b)) operations in two BLAS calls: faster than the butterflies in eager
    PyTorch on CPU at the sizes of the packaged models). ``factors``: cached (H_a, S_b) in x's dtype.
    """
    n = x.shape[-1]
    f = hadamard_factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    if method == "fwht":
        m, p = f
        if m == 1:
            return fwht(x) / math.sqrt(n)
        y = fwht(x.reshape(*x.shape[:-1], m, p))  # rows: H_p (symmetric) applied per block
        y = torch.matmul(_hadamard_small(m).to(device=x.device, dtype=x.dtype), y)  # H_m across blocks
        return y.reshape(x.shape) / math.sqrt(n)
    if method != "kron":
        raise ValueError(f"hadamard_transform method {method!r} unknown; expected kron or fwht")
    if factors is None:
        ha, sb = kron_factors(n)
        factors = (ha.to(device=x.device, dtype=x.dtype), sb.to(device=x.device, dtype=x.dtype))
    ha, sb = factors
    a, b = ha.shape[0], sb.shape[0]
    y = torch.matmul(torch.matmul(ha, x.reshape(*x.shape[:-1], a, b)), sb)  # S_b symmetric
    return y.reshape(x.shape) / math.sqrt(n)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def orthogonal_matrix(n: int, kind: str = "hadamard", seed: int = 0, what: str = "") -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and the kind actually built.

    ``kind``: "hadamard" (normalized H_n, deterministic), "random_hadamard" (H_n D with a
    random sign diagonal D, QuaRot's randomized Hadamard), "random" (Haar-random
    orthogonal), "identity". A Hadamard request for an order with no construction falls
    back to "random" and logs a warning naming ``what``.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64), kind
    if kind in ("hadamard", "random_hadamard"):
        if not has_hadamard(n):
            log.warning("no Hadamard matrix of order %d%s: using a random orthogonal matrix instead", n, f" ({what})" if what else "")
            return random_orthogonal(n, g), "random_orthogonal_fallback"
        h = hadamard_matrix(n)
        if kind == "random_hadamard":
            h = h * random_signs(n, g).unsqueeze(0)
        return h, kind
    if kind == "random":
        return random_orthogonal(n, g), kind
    raise ValueError(f"rotation kind {kind!r} unknown; expected hadamard, random_hadamard, random or identity")
