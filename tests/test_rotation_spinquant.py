import pytest
import torch

from conftest import random_windows, tiny_gemma3, tiny_llama
from llmpress import compress, stage
from llmpress.transform.hadamard import random_orthogonal
from llmpress.transform.spinquant import CayleySGD, cayley_step, orthogonality_error


def test_cayley_step_stays_orthogonal_and_descends():
    """Minimize ||R - T||^2 over rotations: Cayley SGD keeps R^T R = I and approaches T."""
    g = torch.Generator().manual_seed(0)
    target = random_orthogonal(12, g)
    r = torch.eye(12, dtype=torch.float64, requires_grad=True)
    opt = CayleySGD([r], lr=0.1, momentum=0.5)
    first = None
    for _ in range(200):
        loss = (r - target).pow(2).sum()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert orthogonality_error(r.detach()) < 1e-4
    assert loss.item() < first * 0.5


def test_cayley_step_large_lr_still_orthogonal():
    g = torch.Generator().manual_seed(1)
    r = random_orthogonal(32, g)
    grad = torch.randn(32, 32, generator=g, dtype=torch.float64) * 100
    buf = None
    for _ in range(50):
        r, buf = cayley_step(r, grad, buf, lr=5.0, momentum=0.9)
    assert orthogonality_error(r) < 1e-4


@pytest.mark.parametrize("mk", [tiny_llama, tiny_gemma3])
def test_spinquant_learns_orthogonal_rotations_and_keeps_fp_outputs(mk):
    m = mk()
    ids = random_windows(6, 32)
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    compress(m, [stage("spinquant", steps=4, windows=6, seqlen=32, batch=2, lr=2.0)], data=ids)
    summary = m.llmpress_transforms[-1]
    assert summary["method"] == "spinquant"
    assert summary["max_orthogonality_error"] < 1e-4
    assert len(m.llmpress_spinquant_losses) == 4
    # the rotations alone (no quantization stage) leave the float model unchanged
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=False).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # training left no simulation modules behind
    assert not any(type(x).__name__ == "_SimLinear" for x in m.modules())
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())


def test_spinquant_moves_the_rotation():
    from llmpress.transform import spinquant as sq

    m = tiny_llama()
    ids = random_windows(4, 32)
    seen = {}
    orig = sq.learn_rotations

    def spy(*a, **k):
        r1, r2, losses = orig(*a, **k)
        seen["r1"] = r1
        seen["init"] = a[4]
        return r1, r2, losses

    sq.learn_rotations = spy
    try:
        compress(m, [stage("spinquant", steps=3, windows=4, seqlen=32, lr=5.0)], data=ids)
    finally:
        sq.learn_rotations = orig
    assert not torch.allclose(seen["r1"], seen["init"])
    assert orthogonality_error(seen["r1"]) < 1e-4


@pytest.mark.parametrize("mk", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("rotate_weights", [False, True])
def test_training_simulation_is_exact_without_quantizers(mk, rotate_weights):
    """Both simulation paths (rotated weights / rotated activations) compute the float model."""
    from llmpress.arch import get_arch
    from llmpress.transform.rotate import attention_of, fuse_norms, head_layout, residual_rotatable
    from llmpress.transform.spinquant import SpinQuant, _Sim
    from llmpress.transform.rotate import online

    m = mk()
    spec = get_arch(m)
    ids = random_windows(2, 16)
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    fuse_norms(m, spec, final=residual_rotatable(spec))
    g = torch.Generator().manual_seed(0)
    hd, n_h, _ = head_layout(attention_of(m.model.layers[0], spec))
    r1 = random_orthogonal(64, g) if residual_rotatable(spec) else None
    r2 = [random_orthogonal(hd, g) for _ in m.model.layers]
    cfg = SpinQuant(weights=None, activations=None, kv_keys=None, kv_values=None)
    sim = _Sim(m, spec, cfg, r1, r2, online(hd * n_h, "hadamard", 0, ""), online(128, "hadamard", 0, ""), online(hd, "hadamard", 0, ""))
    sim.rotate_weights = rotate_weights
    try:
        sim.refresh()
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=False).logits
    finally:
        sim.remove()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    with torch.no_grad():
        assert ((m(input_ids=ids, use_cache=False).logits - ref).norm() / ref.norm()).item() < 1e-5
