"""Recovery by distillation: a pruned tiny model trained towards the full one."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_windows, tiny_llama

import llmpress
from llmpress.errors import RecipeError
from llmpress.prune.distill import Distill, distill, kl_to_teacher, split
from llmpress.prune.structure import drop_blocks

TRAIN = random_windows(64, 32, seed=1)
HELD_OUT = random_windows(8, 32, seed=2)


def _pair():
    teacher = tiny_llama(layers=3)
    with torch.no_grad():  # sharper next-token distributions than a random model's near-uniform ones
        teacher.model.norm.weight.mul_(6.0)
    student = copy.deepcopy(teacher)
    drop_blocks(student, llmpress.arch.get_arch(student), [1])
    return teacher, student


def test_distillation_lowers_the_held_out_kl():
    teacher, student = _pair()
    before = kl_to_teacher(student, teacher, HELD_OUT)
    assert before > 0.05
    out = distill(student, teacher, TRAIN, Distill(steps=30, lr=3e-4, seed=0))
    after = kl_to_teacher(student, teacher, HELD_OUT)
    assert out["kl_after"] < out["kl_before"] and after < 0.6 * before, (before, after, out)
    assert all(not p.requires_grad or p.grad is None for p in student.parameters())  # no gradients left behind
    assert kl_to_teacher(teacher, teacher, HELD_OUT) == pytest.approx(0.0, abs=1e-6)


def test_distillation_is_seeded_and_norms_only_trains_norms():
    teacher, a = _pair()
    b = copy.deepcopy(a)
    distill(a, teacher, TRAIN, Distill(steps=3, lr=1e-3, seed=4))
    distill(b, teacher, TRAIN, Distill(steps=3, lr=1e-3, seed=4))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = copy.deepcopy(b)
    distill(c, teacher, TRAIN, Distill(steps=3, lr=1e-2, train="norms"))
    changed = {n for (n, p), q in zip(c.named_parameters(), b.parameters()) if not torch.equal(p, q)}
    assert changed and all("norm" in n for n in changed)


def test_held_out_windows_and_shorter_training_windows():
    cfg = Distill(held_out=8, seqlen=8)
    train, held, k = split(TRAIN, cfg)
    assert k == 8 and torch.equal(held, TRAIN[-8:]) and train.shape == (56 * 4, 8)
    assert torch.equal(train[:4].reshape(-1), TRAIN[0])  # the same tokens, cut in order
    train, held, k = split(TRAIN[:7], Distill(held_out=8))  # fewer than 8 windows: none held out
    assert k == 0 and train is held
    teacher, student = _pair()
    out = distill(student, teacher, TRAIN, Distill(steps=20, lr=3e-4, seqlen=16))
    assert out["kept"] and out["kl_after"] < 0.6 * out["kl_before"] and out["train_tokens"] == 20 * 4 * 16
    assert out["kl_after"] == pytest.approx(kl_to_teacher(student, teacher, TRAIN[-8:]), rel=1e-4)


def test_config_errors():
    with pytest.raises(RecipeError, match="train"):
        Distill(train="adapters")
    with pytest.raises(RecipeError, match="lr"):
        Distill(lr=0)
    with pytest.raises(RecipeError, match="seqlen"):
        Distill(seqlen=1)
    with pytest.raises(RecipeError, match="check_every"):
        Distill(check_every=-1)
    with pytest.raises(RecipeError, match="backoff"):
        Distill(backoff=1.5)


@pytest.mark.parametrize(
    "st",
    [
        {"method": "drop_layers", "count": 1},
        {"method": "prune_width", "structure": "heads", "ratio": 0.5, "update": False},
        {"method": "slicegpt", "fraction": 0.25},
    ],
)
def test_a_pruning_stage_recovers_towards_the_model_before_it(st):
    from helpers import QUIET

    teacher = tiny_llama(layers=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)
    m = copy.deepcopy(teacher)
    recipe = llmpress.recipe.Recipe.from_dict({"stages": [{**st, "recover_steps": 30, "recover_lr": 1e-4}]})
    report = llmpress.compress(m, recipe, data=TRAIN, engine=QUIET)
    rec = next(iter(report.stages.values()))["recovery"]
    assert rec["steps"] == 30 and rec["kept"] and rec["kl_after"] < 0.7 * rec["kl_before"]
    assert rec["held_out"] == 8 and rec["train_tokens"] == 30 * 4 * 32
    assert kl_to_teacher(m, teacher, TRAIN[-8:]) == pytest.approx(rec["kl_after"], rel=1e-4)  # measured on the held-out windows
    with pytest.raises(RecipeError, match="lr"):
        llmpress.recipe.Recipe.from_dict({"stages": [{**st, "recover_steps": 5, "recover_lr": 0.0}]})


def test_a_run_that_raises_the_kl_is_undone():
    teacher = tiny_llama(layers=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.9)  # very close to the teacher
    before = [p.detach().clone() for p in student.parameters()]
    out = distill(student, teacher, TRAIN[:8], Distill(steps=5, lr=0.05))  # far too high a learning rate
    assert not out["kept"] and out["kl_trained"] > out["kl_before"] == out["kl_after"]
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), before))


def test_checks_keep_the_best_parameters_and_back_off_a_learning_rate_too_high():
    """lr 0.02 overshoots on the tiny pair: without backoff every check is above the start and
    the start is kept; with checks every 5 steps and 3 backoffs (lr / 3 each, from the best
    parameters) the run recovers; at a good lr the checks change nothing (same batches, same
    steps: the same parameters as a run checked only at the end)."""
    teacher, a = _pair()
    b, c, d = copy.deepcopy(a), copy.deepcopy(a), copy.deepcopy(a)
    stuck = distill(a, teacher, TRAIN, Distill(steps=30, lr=0.02, check_every=5, backoff=0))
    assert not stuck["kept"] and stuck["backoffs"] == 0 and len(stuck["checks"]) == 6
    assert all(kl > stuck["kl_before"] for _, kl in stuck["checks"])
    out = distill(b, teacher, TRAIN, Distill(steps=30, lr=0.02, check_every=5, backoff=3))
    assert out["kept"] and out["backoffs"] == 3 and out["lr_final"] == pytest.approx(0.02 / 27)
    assert out["kl_after"] < 0.8 * out["kl_before"] and out["kl_after"] == min(kl for _, kl in out["checks"])
    assert out["kl_after"] == pytest.approx(kl_to_teacher(b, teacher, TRAIN[-8:]), rel=1e-5)  # the best check's parameters
    checked = distill(c, teacher, TRAIN, Distill(steps=20, lr=3e-4, check_every=5))
    plain = distill(d, teacher, TRAIN, Distill(steps=20, lr=3e-4, check_every=0))
    assert checked["backoffs"] == 0 and [s for s, _ in checked["checks"]] == [5, 10, 15, 20] and plain["checks"] == [[20, plain["kl_after"]]]
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.equal(p, q)


def test_a_distill_stage_recovers_several_cuts_towards_the_model_the_recipe_received():
    from helpers import QUIET

    teacher = tiny_llama(layers=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)
    cuts = [
        {"method": "prune_width", "structure": "query_heads", "ratio": 0.5, "update": False},
        {"method": "prune_width", "structure": "mlp", "ratio": 0.5, "update": False},
    ]
    cut = copy.deepcopy(teacher)  # the same cuts without the distillation: what the stage starts from
    llmpress.compress(cut, llmpress.recipe.Recipe.from_dict({"stages": cuts}), data=TRAIN, engine=QUIET)
    heads_only = copy.deepcopy(teacher)  # the model before the last cut: a per-stage teacher would be this one
    llmpress.compress(heads_only, llmpress.recipe.Recipe.from_dict({"stages": cuts[:1]}), data=TRAIN, engine=QUIET)
    m = copy.deepcopy(teacher)
    recipe = llmpress.recipe.Recipe.from_dict({"stages": [*cuts, {"method": "distill", "steps": 30, "lr": 1e-4}]})
    report = llmpress.compress(m, recipe, data=TRAIN, engine=QUIET)
    rec = report.stages["stage2:distill"]["recovery"]
    held = TRAIN[-8:]
    assert rec["kl_before"] == pytest.approx(kl_to_teacher(cut, teacher, held), rel=1e-4)  # measured against the full model
    assert abs(rec["kl_before"] - kl_to_teacher(cut, heads_only, held)) > 0.05 * rec["kl_before"]
    assert rec["kept"] and rec["kl_after"] < 0.7 * rec["kl_before"]
    assert kl_to_teacher(m, teacher, held) == pytest.approx(rec["kl_after"], rel=1e-4)
    assert m.model.layers[0].mlp.gate_proj.out_features == cut.model.layers[0].mlp.gate_proj.out_features < 128


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"method": "distill"}], "nothing before it"),
        ([{"method": "drop_layers", "count": 1}, {"method": "rtn", "weights": {"bits": 4}}, {"method": "distill"}], "before stage 1 \\(rtn\\)"),
        ([{"method": "drop_layers", "count": 1}, {"method": "distill", "steps": 5, "lr": 0.0}], "lr"),
    ],
)
def test_a_distill_stage_in_the_wrong_place_is_refused_when_read(stages, message):
    with pytest.raises(RecipeError, match=message):
        llmpress.recipe.Recipe.from_dict({"stages": stages})


def test_lora_recovery_changes_only_block_linears_by_low_rank_updates():
    from llmpress.prune.lora import LoRA

    teacher, student = _pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    rank = 4
    out = distill(student, teacher, TRAIN, Distill(steps=30, lr=3e-3, train="lora", lora_rank=rank, lora_alpha=8.0))
    assert out["kept"] and out["kl_after"] < 0.7 * out["kl_before"], out
    assert out["kl_after"] == pytest.approx(kl_to_teacher(student, teacher, TRAIN[-8:]), rel=1e-4)  # merged = trained
    linears = {n: m for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert out["trained_parameters"] == sum(rank * (m.in_features + m.out_features) for m in linears.values())
    assert all(not m._forward_hooks for m in student.modules())  # nothing of LoRA left to save
    for n, p in student.named_parameters():
        delta = p.detach() - before[n]
        if n.removesuffix(".weight") in linears:
            assert 0 < torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= rank, n
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), n  # embeddings and norms untouched
    model = tiny_llama(layers=2)
    lora = LoRA(model, rank=rank, alpha=8.0, seed=1)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)
        ids = HELD_OUT[:2]
        adapted = model(input_ids=ids).logits
        lora.merge()
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-4)


def test_lora_run_that_raises_the_kl_leaves_the_weights_alone():
    teacher = tiny_llama(layers=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.9)
    before = [p.detach().clone() for p in student.parameters()]
    out = distill(student, teacher, TRAIN[:8], Distill(steps=5, lr=0.5, train="lora"))
    assert not out["kept"] and out["kl_trained"] > out["kl_before"]
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), before))
    assert all(not m._forward_hooks for m in student.modules())
    with pytest.raises(RecipeError, match="lora_rank"):
        Distill(train="lora", lora_rank=0)


def test_a_stage_recovers_with_lora():
    from helpers import QUIET

    teacher = tiny_llama(layers=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)
    m = copy.deepcopy(teacher)
    st = {"method": "drop_layers", "count": 1, "recover_steps": 30, "recover_lr": 1e-3, "recover_train": "lora", "recover_lora_rank": 16}
    report = llmpress.compress(m, llmpress.recipe.Recipe.from_dict({"stages": [st]}), data=TRAIN, engine=QUIET)
    rec = report.stages["stage0:drop_layers"]["recovery"]
    assert rec["train"] == "lora" and rec["kept"] and rec["kl_after"] < 0.7 * rec["kl_before"]
    assert torch.equal(m.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with pytest.raises(RecipeError, match="train"):
        llmpress.recipe.Recipe.from_dict({"stages": [{**st, "recover_train": "qlora"}]})


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_loss_in_chunks_of_positions_equals_the_plain_one(family, monkeypatch):
    from conftest import TINY_MODELS

    import llmpress.prune.distill as d

    teacher = TINY_MODELS[family](layers=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = random_windows(3, 40, seed=3)
    monkeypatch.setattr(d, "chunk_tokens", lambda *a, **k: 16)  # 16 positions a chunk: 8 chunks of 120 positions
    heads = d._heads(student, teacher, ids[:1, :8])
    assert heads is not None
    grads = []
    for h in (heads, None):
        student.zero_grad()
        loss = d._loss(student, teacher, ids, 2.0, h)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (chunked, g_chunked), (plain, g_plain) = grads
    assert float(plain) > 1e-6 and float(chunked) == pytest.approx(float(plain), rel=1e-5)
    for a, b in zip(g_chunked, g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_checkpointed_blocks_give_the_same_training_and_recompute_in_the_backward():
    teacher, a = _pair()
    b = copy.deepcopy(a)
    calls = {"plain": 0, "checkpointed": 0}
    for m, key in ((a, "plain"), (b, "checkpointed")):
        m.model.layers[-1].mlp.register_forward_pre_hook(
            lambda *_, k=key: calls.__setitem__(k, calls[k] + 1)
        )  # (a recompute stops once it has what the backward needs: before the mlp returns)
    distill(a, teacher, TRAIN, Distill(steps=3, lr=1e-3, seed=4))
    out = distill(b, teacher, TRAIN, Distill(steps=3, lr=1e-3, seed=4, checkpoint=True))
    assert calls["plain"] > 3 and calls["checkpointed"] == calls["plain"] + 3, calls  # one recompute per step's backward
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n
    assert out["kept"] and not b.model.layers[0].training and not b.model.is_gradient_checkpointing
    assert not b.model.layers[0].self_attn.training  # dropout stayed off inside the checkpointed blocks
