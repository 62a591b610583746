"""Helpers shared by the benchmark scripts: one loaded model, fixed windows, a results table."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmpress import api, models
from llmpress.bench import decode, prefill_seconds
from llmpress.eval.perplexity import perplexity

EVAL_SOURCES = "wiki,news,code"  # the three test texts of issue 22 (docs/second-order.md)


def eval_sets(tok, model, sources: str = EVAL_SOURCES, max_windows: int = 64, seqlen: int = 512) -> dict:
    """Test windows per source (a ``--eval-data`` list), as ``llmpress compress`` draws them."""
    return {s: api.evaluation_windows(tok, model, api.EvalConfig(source=s, seqlen=seqlen, max_windows=max_windows))
            for s in sources.split(",")}  # fmt: skip


def score(model, sets: dict, batch_size: int = 4, progress: bool = False, desc: str = "ppl") -> dict:
    """Perplexity on each source's windows, in the order of ``sets``."""
    return {s: perplexity(model, w, batch_size=batch_size, progress=progress, desc=f"{desc} {s}") for s, w in sets.items()}


def cells(ppl: dict, fp: dict) -> list[str]:
    """'ppl (ratio x)' per source of ``fp``; '-' where a row lacks the source."""
    return [f"{ppl[s]:.3f} ({ppl[s] / fp[s]:.3f}x)" if s in ppl else "-" for s in fp]


class Bench:
    """Loads a model once; each `run(recipe)` compresses a fresh copy and measures perplexity on
    each evaluation source (``ppl``/``ratio`` are the first source's, ``ppl_by_source`` all)."""

    def __init__(self, model: str = "smollm2-135m", eval_windows: int = 64, calib_samples: int = 128, seqlen: int = 512, seed: int = 0,
                 fp_ppl: float | None = None, eval_sources: str = EVAL_SOURCES, out: str | None = None):  # fmt: skip
        self.name = model
        self.model, self.tok = models.load(model)
        self.sets = eval_sets(self.tok, self.model, eval_sources, eval_windows, seqlen)
        self.windows = next(iter(self.sets.values()))
        self.calib_cfg = api.CalibConfig(n_samples=calib_samples, seqlen=seqlen, seed=seed)
        self._calib = None
        self.rows: list[dict] = []
        # out: the JSON written after every row; one from an earlier run with the same settings is resumed
        self.out, self.settings = out, {"eval_windows": eval_windows, "calib_samples": calib_samples, "seqlen": seqlen, "seed": seed,
                                        "sources": list(self.sets)}  # fmt: skip
        if self._resume():
            return
        t = time.perf_counter()
        # fp_ppl: the first source's full-precision figure measured before on the same windows (saves an evaluation)
        first = next(iter(self.sets))
        self.fp = {s: fp_ppl if (s == first and fp_ppl is not None) else perplexity(self.model, w, progress=True, desc=f"fp32 {s}")
                   for s, w in self.sets.items()}  # fmt: skip
        self.fp_ppl = self.fp[first]
        self.add_row("full precision (fp32)" + (" (given)" if fp_ppl is not None else ""), dict(self.fp), 32.0, time.perf_counter() - t, 0.0)

    @property
    def calib(self):
        if self._calib is None:
            self._calib = api.calibration_windows(self.tok, self.model, self.calib_cfg)
        return self._calib

    def add_row(self, label, ppl: dict, bits, eval_s, compress_s, **extra):
        first = next(iter(self.fp))
        row = {"method": label, "ppl": ppl[first], "ratio": ppl[first] / self.fp[first], "ppl_by_source": ppl,
               "ratio_by_source": {s: ppl[s] / self.fp[s] for s in ppl}, "bits_per_weight": bits, "compress_s": compress_s,
               "eval_s": eval_s, **extra}  # fmt: skip
        self.rows.append(row)
        if self.out:
            self.save(self.out)
        print(f"{label:<40} " + "  ".join(cells(ppl, self.fp)) + f"  bits {bits:6.3f}  compress {compress_s:7.1f}s", flush=True)
        return row

    def _resume(self) -> bool:
        """Take the full-precision figures and the finished rows of ``self.out`` when it was written
        with the same model and settings (an interrupted run goes on where it stopped)."""
        if not self.out or not Path(self.out).is_file():
            return False
        old = json.loads(Path(self.out).read_text())
        if old.get("model") != self.name or old.get("settings") != self.settings:
            print(f"{self.out}: other model or settings, not resumed (it will be overwritten)", flush=True)
            return False
        self.fp, self.rows = old["fp"], old["rows"]
        self.fp_ppl = self.fp[next(iter(self.fp))]
        print(f"resumed {self.out}: {len(self.rows)} rows", flush=True)
        return True

    def done(self, label: str) -> dict | None:
        """The row already measured under ``label`` (resumed), or None."""
        return next((r for r in self.rows if r["method"] == label), None)

    def run(self, label: str, recipe, **extra):
        if (row := self.done(label)) is not None:
            print(f"{label:<40} (from {self.out})", flush=True)
            return row
        m = copy.deepcopy(self.model)
        t = time.perf_counter()
        r = api._as_recipe(recipe)
        rep = api.compress(m, r, self.calib if api.needs_calibration(r) else None, tokenizer=self.tok, calib=self.calib_cfg)
        cs = time.perf_counter() - t
        t = time.perf_counter()
        ppl = score(m, self.sets, progress=True, desc=label)
        row = self.add_row(label, ppl, rep.bits_per_weight, time.perf_counter() - t, cs, seconds=rep.seconds, **extra)
        del m
        return row

    def table(self) -> str:
        w = {s: int(x.shape[0]) for s, x in self.sets.items()}
        lines = [f"model {self.name}, test windows of {self.windows.shape[1]} tokens: " + ", ".join(f"{s} {n}" for s, n in w.items()), "",
                 "| method | " + " | ".join(f"{s} ppl (x fp)" for s in self.fp) + " | bits/weight | compress s |",
                 "|---|" + "---|" * (len(self.fp) + 2)]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"| {r['method']} | " + " | ".join(cells(r["ppl_by_source"], self.fp)) + f" | {r['bits_per_weight']:.3f} | {r['compress_s']:.1f} |"
            )
        return "\n".join(lines)

    def save(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        extra = {k: v for k, v in old.items() if k not in ("model", "settings", "fp", "rows")} if old.get("settings") in (None, self.settings) else {}
        data = {"model": self.name, "settings": self.settings, "fp": self.fp, "rows": self.rows, **extra}
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)


def main_guard(fn):
    """Run a script's main: Ctrl-C exits 130, bad input (``UserError``) one line and exit code 2."""
    from llmpress.errors import UserError

    try:
        fn()
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def forward_each(model, windows, hooks) -> None:
    """Run ``model`` on each window alone (no grad), then remove the hooks that watched it."""
    import torch

    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                model(windows[i : i + 1])
    finally:
        for h in hooks:
            h.remove()


# ---- resumable tables (domains.py, codebooks.py, learned.py): rows appended to a JSON as they finish


def load_results(path: Path) -> dict:
    """A resumable benchmark JSON (``{"fp": {source: ppl}, "rows": {key: row}}``), empty when missing."""
    return json.loads(path.read_text()) if path.exists() else {"rows": {}, "fp": {}}


def save_results(path: Path, res: dict) -> None:
    """Write ``res`` atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(path)


def preset_recipe(name: str, rename: str | None = None, only: str | None = None, **changes) -> dict:
    """Preset ``name`` as a recipe dict with ``changes`` set on every stage (``only``: on the
    stages of that method) (``weights`` merged into the stage's own): e.g.
    ``preset_recipe("gptq-w3g64", "gptq-w2g64", weights={"bits": 2})``."""
    import yaml

    from llmpress.recipe import presets

    d = yaml.safe_load(presets()[name].read_text())
    for st in d["stages"]:
        if only is not None and st["method"] != only:
            continue
        for k, v in changes.items():
            if not isinstance(v, dict):
                st[k] = v
            elif isinstance(st.get(k), dict):  # a stage without that mapping (e.g. no weights) keeps none
                st[k] = {**st[k], **v}
    d["name"] = rename or name
    d["description"] = f"{name} with {changes}"
    return d


def model_folder(model: str) -> Path:
    """The HF folder of a packaged alias (converted once) or of a local model folder."""
    return models.packaged_folder(model) if model in models.PACKAGED else Path(model)


def table_parser(doc: str, script: str, rows) -> argparse.ArgumentParser:
    """The arguments every resumable table script takes (model, test and calibration windows,
    --rows, --out, --table); the script adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or a local HF folder")
    ap.add_argument("--windows", type=int, default=64, help="test windows of 512 tokens per text")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows of 512 tokens")
    ap.add_argument("--rows", default="", help=f"comma list of rows (default all): {','.join(rows)}")
    ap.add_argument("--out", help=f"results JSON (default runs/bench/{script}-MODEL.json)")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    return ap


def results_path(out: str | None, script: str, model: str) -> Path:
    """``--out``, or runs/bench/SCRIPT-MODEL.json (the model's folder name for a local path)."""
    return Path(out or f"runs/bench/{script}-{Path(model).name}.json")


def print_saved_table(out: Path, table) -> int:
    """``--table``: print ``table`` of the results JSON ``out``; 2 (with a message) when there is none."""
    if not out.exists():
        print(f"no results at {out}", file=sys.stderr)
        return 2
    print(table(load_results(out)))
    return 0


def pick_rows(known: dict, wanted: str | None) -> list[str]:
    """``--rows``: a comma list of keys of ``known`` (all when empty); SystemExit(2) naming unknown keys."""
    if not wanted:
        return list(known)
    keys = [k for k in wanted.split(",") if k]
    bad = [k for k in keys if k not in known]
    if bad:
        print(f"unknown row(s) {', '.join(bad)}; known: {', '.join(known)}", file=sys.stderr)
        sys.exit(2)
    return keys


class Resumable:
    """One model, its test windows and full-precision figures, and a JSON of rows by key: a row
    already in the JSON is skipped, each new one is written as soon as it finishes. The JSON
    must have been made with the same model, test windows and calibration windows."""

    def __init__(self, out: Path, model: str, windows: int = 64, calib: int = 128, seqlen: int = 512, sources: str = EVAL_SOURCES, seed: int = 0):  # fmt: skip
        import torch

        self.out, self.name = Path(out), model
        self.res = load_results(self.out)
        from llmpress import shrink

        settings = {"model": model, "eval_windows": windows, "calib_samples": calib, "seqlen": seqlen, "seed": seed,
                    "test_shrink": shrink.in_force()}  # fmt: skip
        old = {k: self.res.get(k) for k in settings if k in self.res}
        if old and old != {k: settings[k] for k in old}:
            print(f"{self.out} was made with other settings ({old}); pass another --out", file=sys.stderr)
            sys.exit(2)
        self.res.update(settings)
        self.model, self.tok = models.load(model)
        self.sets = eval_sets(self.tok, self.model, sources, windows, seqlen)
        self.res["windows"] = {s: int(w.shape[0]) for s, w in self.sets.items()}
        self.res["threads"] = torch.get_num_threads()
        for s, w in self.sets.items():
            if s not in self.res["fp"]:
                self.res["fp"][s] = perplexity(self.model, w, progress=True, desc=f"fp32 {s}")
                save_results(self.out, self.res)
        self.calib_cfg = api.CalibConfig(n_samples=calib, seqlen=seqlen, seed=seed)
        self._calib = None

    @property
    def calib(self):
        if self._calib is None:
            self._calib = api.calibration_windows(self.tok, self.model, self.calib_cfg)
        return self._calib

    def done(self, key: str) -> bool:
        if key in self.res["rows"]:
            print(f"{key}: in {self.out}, skipped", flush=True)
            return True
        return False

    def record(self, key: str, ppl: dict, bits: float, compress_s: float, **extra) -> dict:
        """Add row ``key`` (perplexity per source, bits per weight, compression wall seconds) and save."""
        row = {"ppl": ppl, "bits_per_weight": bits, "compress_s": compress_s, **extra}
        on_disk = load_results(self.out).get("rows", {})  # rows another run (or a hand) wrote meanwhile stay
        self.res["rows"] = {**on_disk, key: row}
        save_results(self.out, self.res)
        print(f"{key}: " + "  ".join(cells(ppl, self.res["fp"])) + f"  bits {bits:.3f}  compress {compress_s:.1f}s", flush=True)
        return row

    def compress(self, key: str, recipe, setup_s: float = 0.0, save_to: Path | None = None, **extra) -> dict | None:
        """Row ``key``: ``recipe`` (preset name, dict or Recipe) through ``api.compress`` on a fresh
        copy, scored on every source; ``setup_s`` (e.g. planning) is added to the wall time;
        ``save_to``: also save the packed checkpoint there (e.g. for a serving section)."""
        if self.done(key):
            return None
        m = copy.deepcopy(self.model)
        r = api._as_recipe(recipe)
        t = time.perf_counter()
        rep = api.compress(m, r, self.calib if api.needs_calibration(r) else None, tokenizer=self.tok, calib=self.calib_cfg)
        cs = time.perf_counter() - t + setup_s
        t = time.perf_counter()
        ppl = score(m, self.sets, progress=True, desc=key)
        row = self.record(key, ppl, rep.bits_per_weight, cs, eval_s=time.perf_counter() - t, recipe=r.to_dict(), **extra)
        if save_to is not None:
            api.save(m, self.tok, save_to, report=rep, overwrite=True)
        del m
        return row


def results_table(res: dict, order: list[str] | None = None, labels: dict | None = None, group=None) -> str:
    """Markdown of a resumable JSON: one line per row (``order``, else the JSON's), perplexity
    and ratio to fp per source, bits per weight, compression seconds. ``labels``: key -> shown
    name; ``group(key, row)``: a first column (e.g. the bits class)."""
    fp = res["fp"]
    g = ["class"] if group else []
    lines = [f"model {res.get('model')}; test windows " + ", ".join(f"{s} {n}" for s, n in (res.get("windows") or {}).items())
             + f"; {res.get('calib_samples')} calibration windows; fp32 " + ", ".join(f"{s} {v:.3f}" for s, v in fp.items()), "",
             "| " + " | ".join(g + ["method"] + [f"{s} ppl (x fp)" for s in fp] + ["bits/weight", "compress s"]) + " |",
             "|" + "---|" * (len(g) + len(fp) + 3)]  # fmt: skip
    for k in order or list(res["rows"]):
        r = res["rows"].get(k)
        if r is None:
            continue
        first = [group(k, r)] if group else []
        lines.append("| " + " | ".join(first + [(labels or {}).get(k, k)] + cells(r["ppl"], fp)
                                        + [f"{r['bits_per_weight']:.3f}", f"{r['compress_s']:.1f}"]) + " |")  # fmt: skip
    return "\n".join(lines)


def ensure_peer_venv(venv: Path, script: Path, pkg: str) -> str | None:
    """Make a peer tool's virtual environment ``venv`` with ``script`` (a peer_*.sh calling
    peer_venv.sh) unless its install stamp for ``pkg`` ("name==version") is there; return
    why it failed, or None."""
    import subprocess

    if (venv / f".installed-{pkg.replace('==', '-')}").exists():
        return None
    print(f"creating {venv} ({pkg}) with {script.name} ...", flush=True)
    r = subprocess.run(["bash", str(script), str(venv)], capture_output=True, text=True)
    if r.returncode:
        return f"{script.name} failed (exit {r.returncode}): {(r.stderr or r.stdout)[-2000:]}"
    return None


def speed(model, tok, repeats: int, new_tokens: int) -> dict:
    """Prefill seconds (512 tokens), decode tokens/s at batch 1 and 8 (medians)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else len(tok)
    ids = torch.randint(10, vocab, (8, 512), generator=g)
    prefill_seconds(model, ids[:1])  # warm-up (first-call allocations)
    decode(model, ids[:8, :32], 2)
    pre = statistics.median(prefill_seconds(model, ids[:1]) for _ in range(repeats))
    tps = {}
    for b in (1, 8):
        secs = statistics.median(decode(model, ids[:b, :32], new_tokens)[0] for _ in range(repeats))
        tps[b] = b * new_tokens / secs
    return {"prefill_512_s": pre, "decode_tps_b1": tps[1], "decode_tps_b8": tps[8]}
