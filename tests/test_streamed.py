"""Streamed compression (``--stream``, llmpress/streamed.py): the blocks are read from the
model's safetensors files one at a time and written as soon as they are compressed; the
result equals the in-memory run's bit for bit, each tensor is read once, at most one block is
in memory, and a broken folder or a recipe streaming cannot run is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from helpers import QUIET, cli_fails, run_cli
from safetensors.torch import load_file

from llmpress import api
from llmpress.errors import UserError
from llmpress.weights import INDEX_FILE, WeightIndex

CALIB = api.CalibConfig(n_samples=8, seqlen=32, batch_size=4)
EVAL = api.EvalConfig(source="wiki,news", max_windows=4, seqlen=32, batch_size=2)


def sharded(folder: Path, family: str = "llama") -> Path:
    """A tiny model saved as several safetensors shards with an index (as large models come)."""
    from transformers import AutoModelForCausalLM

    plain = save_tiny_model(folder.with_name(folder.name + "-one"), family)
    AutoModelForCausalLM.from_pretrained(plain).save_pretrained(folder, max_shard_size="60KB")
    for f in plain.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    assert (folder / INDEX_FILE).exists() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def both(model: Path, out: Path, recipe: str, fmt: str = "packed"):
    kw = dict(calib=CALIB, evaluation=EVAL, engine=QUIET, save_format=fmt)
    mem = api.run_pipeline(str(model), recipe, out=str(out / "mem"), **kw)
    streamed = api.run_pipeline(str(model), recipe, out=str(out / "stream"), stream=True, **kw)
    return mem, streamed


@pytest.mark.parametrize(
    ("recipe", "fmt", "family"),
    [
        ("gptq-w4g64", "packed", "llama"),
        ("rtn-w4g64", "packed", "llama"),
        ("awq-gptq-w4g64", "packed", "llama"),
        ("sparsegpt-50", "hf-fakequant", "llama"),
        ("gptq-w4g64", "packed", "gemma3"),
    ],
)
def test_streamed_equals_in_memory(tmp_path, recipe, fmt, family):
    model = sharded(tmp_path / "model", family)
    mem, streamed = both(model, tmp_path, recipe, fmt)
    a, b = tensors_of(tmp_path / "mem"), tensors_of(tmp_path / "stream")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # one file per block and one for the rest
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) == 3
    for fig in ("baseline", "compressed"):
        assert getattr(mem, fig)["ppl_by_source"] == getattr(streamed, fig)["ppl_by_source"], fig
    assert streamed.layers == mem.layers
    assert streamed.compressed["bits_per_weight"] == mem.compressed["bits_per_weight"]
    assert streamed.environment["streamed"] and streamed.environment["max_blocks_in_memory"] == 1
    # what llmpress loads back from the two folders computes the same perplexity
    back = [api.evaluate(str(tmp_path / d), EVAL, progress=False).compressed["ppl_by_source"] for d in ("mem", "stream")]
    assert back[0] == back[1] == mem.compressed["ppl_by_source"]
    if fmt == "packed":
        meta = json.loads((tmp_path / "stream" / "llmpress.json").read_text())
        assert meta["format"] == "llmpress-packed-v3" and len(meta["weights_files"]) == 3
    else:  # plain transformers loads the sharded folder
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
        assert torch.equal(m.state_dict()["model.layers.1.mlp.down_proj.weight"], a["model.layers.1.mlp.down_proj.weight"])


def test_each_tensor_read_once_and_one_block_at_a_time(tmp_path, monkeypatch):
    from llmpress import streamed as streamed_mod

    model = sharded(tmp_path / "model")
    reads: list[str] = []
    materialized: list[int] = []
    read, load_block = WeightIndex.read, streamed_mod.StreamedModel.load_block

    def counting_read(self, name, dtype=None):
        reads.append(name)
        return read(self, name, dtype)

    def watching_load(self, i):
        block = load_block(self, i)
        # parameters not on the meta device right now: one block's (embeddings, norm and head wait on disk)
        materialized.append(sum(p.numel() for p in self.model.parameters() if p.device.type != "meta"))
        return block

    monkeypatch.setattr(WeightIndex, "read", counting_read)
    monkeypatch.setattr(streamed_mod.StreamedModel, "load_block", watching_load)
    api.run_pipeline(str(model), "gptq-w4g64", out=str(tmp_path / "o"), calib=CALIB, evaluation=EVAL, engine=QUIET, stream=True)
    stored = set(WeightIndex(model).shapes)
    in_blocks = sorted(k for k in stored if k.startswith("model.layers."))
    assert sorted(k for k in reads if k.startswith("model.layers.")) == in_blocks  # each block tensor exactly once
    # the others (embeddings, final norm) read before the blocks and again after them
    assert sorted(k for k in reads if not k.startswith("model.layers.")) == sorted(2 * [k for k in stored if k not in in_blocks])
    per_block = materialized[0]
    assert len(materialized) == 2 and materialized == [per_block, per_block]
    assert per_block == sum(p.numel() for p in _block_of(model).parameters())


def _block_of(model: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model).model.layers[0]


def test_missing_shard_is_named(tmp_path, capsys, outs):
    model = sharded(tmp_path / "model")
    index = json.loads((model / INDEX_FILE).read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (model / gone).unlink()
    cli_fails(capsys, ["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(outs / "o"), "--stream"], gone, "missing")
    assert not outs.exists() or not any(outs.iterdir())


def test_shape_mismatch_names_the_file(tmp_path, capsys, outs):
    model = sharded(tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (model / "config.json").write_text(json.dumps(cfg))
    index = json.loads((model / INDEX_FILE).read_text())
    line = cli_fails(capsys, ["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(outs / "o"), "--stream"], "config.json implies")
    name = line.split(" is ")[0].rsplit(" ", 1)[-1]
    assert index["weight_map"][name] in line  # the file holding the tensor
    assert not outs.exists() or not any(outs.iterdir())


def test_nonfinite_block_is_refused_and_nothing_written(tmp_path, capsys, outs):
    def poison(m):
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")

    model = save_tiny_model(tmp_path / "bad", mutate=poison)
    cli_fails(
        capsys, ["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(outs / "o"), "--stream"], "model.layers.1.mlp.up_proj.weight", "NaN"
    )
    assert not outs.exists() or not any(outs.iterdir())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--recipe", "quarot-w4a4kv4-gptq"], "transforms the whole model"),
        (["--recipe", "llm-int8"], "run-time modules"),
        (["--recipe", "gptq-w4g64", "--nproc", "2"], "one process"),
    ],
)
def test_refused_before_loading(tmp_path, capsys, outs, extra, fragment):
    # the model folder does not exist: a refusal naming the recipe or flag proves nothing was loaded
    cli_fails(capsys, ["compress", str(tmp_path / "no-such-model"), *extra, "--out", str(outs / "o"), "--stream"], fragment)


def test_hub_id_refused(capsys, outs):
    cli_fails(capsys, ["compress", "someone/some-model", "--recipe", "rtn-w4g64", "--stream", "--no-eval"], "local folder")


def test_cli_stream_runs(tmp_path):
    model = sharded(tmp_path / "model")
    out = tmp_path / "o"
    rc = run_cli(["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(out), "--stream", "--no-progress", "--no-eval"])
    assert rc == 0
    meta = json.loads((out / "llmpress.json").read_text())
    assert meta["format"] == "llmpress-packed-v3"
    assert set(meta["layers"]) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip


def test_weight_index_reads_and_checks(tmp_path):
    model = sharded(tmp_path / "model")
    idx = WeightIndex(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = idx.read(name)
    assert idx.reads[name] == 1 and tuple(t.shape) == idx.shapes[name]
    with pytest.raises(UserError, match="no weights file holds model.extra"):
        idx.check({"model.extra": (1,)})
    idx.check({name: idx.shapes[name]})  # agrees: no error


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_eval_equals_in_memory(tmp_path, family):
    model = sharded(tmp_path / "model", family)
    mem = api.evaluate(str(model), EVAL, progress=False)
    streamed = api.evaluate(str(model), EVAL, progress=False, stream=True)
    assert streamed.compressed["ppl_by_source"] == mem.compressed["ppl_by_source"]
    assert streamed.compressed["n_params"] == mem.compressed["n_params"]
    assert streamed.environment["max_blocks_in_memory"] == 1


def test_streamed_eval_refuses_a_checkpoint(tmp_path, capsys):
    model = sharded(tmp_path / "model")
    out = tmp_path / "o"
    assert run_cli(["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(out), "--no-progress", "--no-eval"]) == 0
    capsys.readouterr()
    cli_fails(capsys, ["eval", str(out), "--stream"], "written by llmpress", "without --stream")


KILL = """
import os, signal, sys
from llmpress.calib import resume
from llmpress.cli import main
save = resume.BlockCheckpoints.save
def killing(self, i, *a, **kw):
    save(self, i, *a, **kw)
    if i == 0:
        os.kill(os.getpid(), signal.SIGKILL)
resume.BlockCheckpoints.save = killing
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_streamed_run_resumes_to_the_same_folder(tmp_path):
    """--stream killed (SIGKILL) after block 0, then --resume: every weights file byte for byte
    the uninterrupted streamed run's, the same perplexities; the killed run's partial output
    folder and the block checkpoints are gone."""
    import os
    import subprocess
    import sys

    model = sharded(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["compress", str(model), "--recipe", "gptq-w4g64", "--stream", "--calib-samples", "6", "--calib-seqlen", "24", "--batch-size", "2",
            "--eval-data", "wiki,news", "--eval-windows", "2", "--seqlen", "24"]  # fmt: skip
    runs = tmp_path / "runs"
    plain = subprocess.run([sys.executable, "-m", "llmpress", *argv, "--out", str(runs / "a")], env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    out = runs / "b"
    killed = subprocess.run([sys.executable, "-c", KILL, *argv, "--out", str(out)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9 and not out.exists()
    assert (runs / ".b.resume" / "block-0.json").exists() and any(p.name.startswith(".b.tmp-") for p in runs.iterdir())
    again = subprocess.run([sys.executable, "-m", "llmpress", *argv, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed after block 0" in again.stderr
    files = sorted(p.name for p in (runs / "a").glob("*.safetensors"))
    assert files == sorted(p.name for p in out.glob("*.safetensors")) and len(files) == 3
    for f in files:
        assert (out / f).read_bytes() == (runs / "a" / f).read_bytes(), f
    ra, rb = (json.loads((p / "llmpress.json").read_text())["report"] for p in (runs / "a", out))
    for fig in ("baseline", "compressed"):
        assert rb[fig]["ppl_by_source"] == ra[fig]["ppl_by_source"], fig
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"]
