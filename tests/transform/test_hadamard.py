import logging

import pytest
import torch

from llmpress.runtime.online_hadamard import OnlineRotation
from llmpress.transform.hadamard import (
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    orthogonal_matrix,
    sylvester,
)

# every size the rotations use on the tiny fixtures and the packaged models:
# tiny 16/64/128, SmolLM2 64/576/1536, gemma-3-270m 256/640/1024/2048, and base orders
SIZES = [2, 4, 8, 12, 16, 20, 28, 36, 48, 64, 128, 256, 576, 640, 1024, 1536, 2048]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_orthogonal_and_pm1(n):
    h = hadamard_matrix(n, normalized=False)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=h.dtype), atol=1e-9)
    hn = hadamard_matrix(n)
    assert torch.allclose(hn @ hn.T, torch.eye(n, dtype=hn.dtype), atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_dense(n):
    x = torch.randn(5, 3, n, dtype=torch.float64)
    dense = x @ hadamard_matrix(n).T
    for method in ("fwht", "kron"):
        assert torch.allclose(hadamard_transform(x, method), dense, atol=1e-10), method
        # float32 too (the runtime dtype)
        assert torch.allclose(hadamard_transform(x.float(), method), dense.float(), atol=1e-4), method
    rot = OnlineRotation(n, "hadamard")
    assert torch.allclose(rot(x.float()), dense.float(), atol=1e-4)


def test_kron_factors_rebuild_the_matrix():
    from llmpress.transform.hadamard import kron_factors

    for n in SIZES:
        ha, sb = kron_factors(n)
        assert torch.equal(torch.kron(ha, sb), hadamard_matrix(n, normalized=False))


def test_factorizations_of_model_sizes():
    assert hadamard_factor(576) == (36, 16)  # Paley II (q=17) x Sylvester 16
    assert hadamard_factor(1536) == (12, 128)  # Paley I (q=11) x 128
    assert hadamard_factor(640) == (20, 32)  # Paley I (q=19) x 32
    assert hadamard_factor(2048) == (1, 2048)


@pytest.mark.parametrize("n", [1, 2, 4, 64, 256])
def test_fwht_is_sylvester(n):
    x = torch.randn(7, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(n), atol=1e-10)


def test_fallback_is_orthogonal_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        m, kind = orthogonal_matrix(10, "hadamard", what="test site")
    assert kind == "random_orthogonal_fallback"
    assert "no Hadamard matrix of order 10" in caplog.text and "test site" in caplog.text
    assert torch.allclose(m @ m.T, torch.eye(10, dtype=m.dtype), atol=1e-12)


@pytest.mark.parametrize("kind", ["hadamard", "random_hadamard", "random"])
def test_orthogonal_kinds(kind):
    m, got = orthogonal_matrix(576, kind, seed=3)
    assert got == kind
    assert torch.allclose(m @ m.T, torch.eye(576, dtype=m.dtype), atol=1e-10)


def test_online_rotation_kinds_match_their_matrix():
    g = torch.Generator().manual_seed(0)
    from llmpress.transform.hadamard import random_orthogonal

    n = 48
    rots = [
        OnlineRotation(n, "hadamard"),
        OnlineRotation(n, "dense", matrix=random_orthogonal(n, g)),
        OnlineRotation(
            n,
            "blocks",
            blocks=(
                torch.stack([random_orthogonal(16, g) for _ in range(3)]),
                torch.randperm(n, generator=g),
                torch.stack([random_orthogonal(16, g) for _ in range(3)]),
            ),
        ),
    ]
    x = torch.randn(4, n, dtype=torch.float64)
    for r in rots:
        m = r.matrix()
        assert torch.allclose(m @ m.T, torch.eye(n, dtype=m.dtype), atol=1e-6), r.kind
        assert torch.allclose(r(x.float()).double(), x @ m.T, atol=1e-5), r.kind
