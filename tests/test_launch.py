"""`llmpress compress ... --nproc N`: the command users run, on two local processes, against one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import shrink_env
from safetensors.torch import load_file

from llmpress.launch import without_nproc

TIMEOUT_S = 600


def _compress(model_dir, out, env, *extra):
    cmd = [sys.executable, "-m", "llmpress", "compress", str(model_dir), "--recipe", "gptq-w4g64", "--out", str(out),
           "--json", str(out) + ".json", "--eval-data", "wiki,news", "--batch-size", "1", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture
def env(tiny_alias_folders):
    import os

    return {**os.environ, **shrink_env(tiny_alias_folders, windows=6), "OMP_NUM_THREADS": "1"}


def test_two_processes_write_what_one_writes(tmp_path, tiny_model_dir, env):
    one = _compress(tiny_model_dir, tmp_path / "one", env, "--kl-windows", "4")
    two = _compress(tiny_model_dir, tmp_path / "two", env, "--kl-windows", "4", "--nproc", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("llmpress compress") == 1  # one report, from rank 0
    a, b = load_file(str(tmp_path / "one" / "model.llmpress.safetensors")), load_file(str(tmp_path / "two" / "model.llmpress.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)  # the same codes and scales, bit for bit
    ra, rb = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert ra["calibration"]["windows"] == rb["calibration"]["windows"] == 6
    assert (ra["environment"]["ranks"], rb["environment"]["ranks"]) == (1, 2)
    for s in ("wiki", "news"):  # windows shared out: the same perplexity up to float summation order
        assert rb["compressed"]["ppl_by_source"][s] == pytest.approx(ra["compressed"]["ppl_by_source"][s], rel=1e-5)
        assert rb["baseline"]["ppl_by_source"][s] == pytest.approx(ra["baseline"]["ppl_by_source"][s], rel=1e-5)
        # KL on the first 4 windows overall: 3 from rank 0's share, 1 from rank 1's
        assert rb["compressed"]["kl_by_source"][s] == pytest.approx(ra["compressed"]["kl_by_source"][s], rel=1e-4)
        assert rb["compressed"]["top1_by_source"][s] == ra["compressed"]["top1_by_source"][s]
        assert rb["evaluation"]["kl_tokens_by_source"][s] == ra["evaluation"]["kl_tokens_by_source"][s] == 4 * 31
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["one", "one.json", "two", "two.json", "tiny-llama"])


def test_a_refusal_on_two_processes_is_one_line_and_exit_2(tmp_path, tiny_model_dir, env):
    res = subprocess.run(
        [sys.executable, "-m", "llmpress", "compress", str(tiny_model_dir), "--recipe", "no-such-preset", "--out", str(tmp_path / "o"), "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith("llmpress: error:") and "no-such-preset" in err[0]
    assert not (tmp_path / "o").exists()


def test_torchrun_launch_writes_what_one_process_writes(tmp_path, tiny_model_dir, env):
    """The README's other launch: ``torchrun --nproc-per-node 2 -m llmpress compress ...``."""
    one = _compress(tiny_model_dir, tmp_path / "one", env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmpress", "compress", str(tiny_model_dir),
           "--recipe", "gptq-w4g64", "--out", str(tmp_path / "tr"), "--batch-size", "1", "--no-eval"]  # fmt: skip
    tr = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0 and tr.returncode == 0, tr.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "model.llmpress.safetensors")), load_file(str(tmp_path / "tr" / "model.llmpress.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    assert json.loads((tmp_path / "tr" / "llmpress.json").read_text())["report"]["environment"]["ranks"] == 2


def test_without_nproc():
    assert without_nproc(["compress", "m", "--nproc", "2", "--out", "o"]) == ["compress", "m", "--out", "o"]
    assert without_nproc(["compress", "m", "--nproc=4"]) == ["compress", "m"]
