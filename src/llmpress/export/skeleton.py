"""A fresh model of a config, with uninitialized (or meta-device) tensors."""

from __future__ import annotations

import torch
import torch.nn as nn


def skeleton(config, dtype: torch.dtype | None = None, meta: bool = False) -> nn.Module:
    """The model class of ``config`` with uninitialized (or meta) tensors."""
    from transformers import AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize (slower, same result once loaded)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
