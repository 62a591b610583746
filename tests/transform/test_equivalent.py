"""Learnable equivalent transformations (transform/equivalent.py): folding scales and shifts
leaves the full-precision block unchanged, the functional form equals the folded block,
groups behind an online rotation are skipped, the created structure can be undone."""

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama

from llmpress import compress, stage
from llmpress.arch import get_arch, get_module
from llmpress.quant.block_recon import block_forward
from llmpress.transform.equivalent import (
    block_tensors,
    fold_let,
    group_channels,
    let_groups,
    let_tensors,
    prepare_shifts,
    shift_allowed,
    undo_shifts,
)
from llmpress.transform.scaling import NormShift


def _block_io(model, index=0):
    block = model.model.layers[index]
    got = {}

    def pre(_m, args, kwargs):
        got["x"], got["args"], got["kwargs"] = args[0].detach(), tuple(args[1:]), dict(kwargs)

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=random_windows(2, 16), use_cache=False)
    h.remove()
    return block, got


def _out(block, io, tensors=None):
    with torch.no_grad():
        return block_forward(block, tensors or {}, io["x"], io["args"], io["kwargs"])


def _random_let(block, spec, groups, shifts: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales, zs = [], []
    for grp in groups:
        n = group_channels(block, spec, grp)
        scales.append(torch.exp(0.7 * torch.randn(n, generator=g)))
        zs.append(0.3 * torch.randn(n, generator=g) if shifts and shift_allowed(grp) else None)
    return scales, zs


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("shifts", [False, True])
def test_folding_keeps_the_full_precision_block(make, shifts):
    model = make()
    spec = get_arch(model)
    block, io = _block_io(model)
    ref = _out(block, io)
    targets = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    groups, rotated = let_groups(block, spec, targets)
    assert [g.kind for g in groups] == ["norm", "v", "norm", "up"] and rotated == []
    scales, zs = _random_let(block, spec, groups, shifts)
    made = prepare_shifts(block, spec, [g for g, z in zip(groups, zs) if z is not None])
    assert torch.allclose(_out(block, io), ref, atol=1e-6)  # zero structure: same function
    # the functional form, in float32, before folding
    t = let_tensors(block, spec, groups, scales, zs, block_tensors(block))
    assert torch.allclose(_out(block, io, t), ref, atol=1e-4 * ref.abs().max())
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    new = fold_let(block, spec, groups, scales, zs)
    assert set(new) == set(t)
    out = _out(block, io)
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, float(ref.abs().max()))), float((out - ref).abs().max())
    changed = [n for n, p in block.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("layernorm" in n for n in changed) and any("o_proj" in n for n in changed)
    assert (isinstance(get_module(block, groups[0].prev), NormShift)) == shifts
    if shifts:
        assert get_module(block, spec.q).bias is not None and len(made) > 0


def test_a_wrong_scale_changes_the_function():
    """The check above can fail: folding a scale into the readers only (not the norm) moves the output."""
    model = tiny_llama()
    spec = get_arch(model)
    block, io = _block_io(model)
    ref = _out(block, io)
    groups, _ = let_groups(block, spec, {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    scales, _ = _random_let(block, spec, groups[:1], False)
    t = let_tensors(block, spec, groups[:1], scales, [None], block_tensors(block))
    t.pop(f"{groups[0].prev}.weight")
    assert not torch.allclose(_out(block, io, t), ref, atol=1e-3)


def test_undo_shifts_restores_the_structure():
    model = tiny_llama()
    spec = get_arch(model)
    block = model.model.layers[0]
    names = set(dict(block.named_parameters()))
    groups, _ = let_groups(block, spec, {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    made = prepare_shifts(block, spec, groups)
    assert set(dict(block.named_parameters())) != names
    undo_shifts(block, made)
    assert set(dict(block.named_parameters())) == names
    assert not any(isinstance(m, NormShift) for m in block.modules())


def test_groups_behind_online_rotations_are_skipped():
    model = tiny_llama()
    compress(model, [stage("quarot", residual="online")], data=random_windows(2, 8))
    spec = get_arch(model)
    block = model.model.layers[0]
    usable, rotated = let_groups(block, spec, {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    # norm outputs, the attention output and the down_proj input are rotated online
    assert usable == [] and [g.kind for g in rotated] == ["norm", "v", "norm", "up"]
    offline = tiny_llama()
    compress(offline, [stage("quarot", residual="offline")], data=random_windows(2, 8))
    usable, rotated = let_groups(offline.model.layers[0], spec, {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    assert [g.kind for g in usable] == ["norm", "norm"] and [g.kind for g in rotated] == ["v", "up"]


def test_only_targeted_groups():
    model = tiny_llama()
    spec = get_arch(model)
    block = model.model.layers[0]
    usable, _ = let_groups(block, spec, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"})
    assert [g.kind for g in usable] == ["norm"]  # up -> down needs up_proj targeted too
