"""Model structure as data.

Each supported family is described once: where the decoder blocks are, which linears
form the attention and the MLP, which norm feeds which linears, and the norm kind.
Algorithms (smoothing, rotation, sequential calibration) read this table instead of
carrying per-model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .errors import UnsupportedArchitecture


@dataclass(frozen=True)
class NormFeed:
    """A norm and the linears that read its output (their inputs are the norm's output)."""

    norm: str  # path relative to the block
    linears: tuple[str, ...]  # paths relative to the block


@dataclass(kw_only=True, frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # path of the decoder block list from the top model
    embed: str
    final_norm: str
    lm_head: str
    q: str
    k: str
    v: str
    o: str
    gate: str | None
    up: str
    down: str
    norm_feeds: tuple[NormFeed, ...]
    norm_kind: str = "rms"  # "rms": x/rms * w ; "rms_1p": x/rms * (1 + w) (gemma)
    qk_norm: tuple[str, ...] = ()
    post_norms: tuple[str, ...] = ()  # norms applied to a sub-layer's output (gemma)
    needs_bos: bool = False  # perplexity windows start with BOS
    # groups of linears in the order data flows through a block: compressing one group
    # before collecting statistics for the next is "true sequential" calibration
    sequential_groups: tuple[tuple[str, ...], ...] = field(default=())

    def block_linears(self) -> tuple[str, ...]:
        names = [self.q, self.k, self.v, self.o]
        if self.gate:
            names.append(self.gate)
        names += [self.up, self.down]
        return tuple(names)

    def groups(self) -> tuple[tuple[str, ...], ...]:
        if self.sequential_groups:
            return self.sequential_groups
        mlp_in = (self.gate, self.up) if self.gate else (self.up,)
        return ((self.q, self.k, self.v), (self.o,), mlp_in, (self.down,))


def _llama_like(family: str, model_types: tuple[str, ...], **kw) -> ArchSpec:
    base = dict(
        family=family,
        model_types=model_types,
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
        norm_feeds=(
            NormFeed("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormFeed("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    )
    base.update(kw)
    return ArchSpec(**base)


ARCHS: dict[str, ArchSpec] = {}
for _spec in (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",)),
    _llama_like("qwen3", ("qwen3",), qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
    _llama_like(
        "gemma3",
        ("gemma3_text", "gemma3"),
        norm_kind="rms_1p",
        needs_bos=True,
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_feeds=(
            NormFeed("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormFeed("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
):
    for _mt in _spec.model_types:
        ARCHS[_mt] = _spec


def supported() -> list[str]:
    return sorted(ARCHS)


def get_arch(model: nn.Module) -> ArchSpec:
    """The structure table for ``model``; a clear error for an unknown family."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        model_type = "gemma3"
    spec = ARCHS.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model_type values: {', '.join(supported())}"
        )
    return spec


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or get_arch(model)
    return get_module(model, spec.blocks)
