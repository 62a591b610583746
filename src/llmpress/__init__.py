"""llmpress: compress causal language models after training, and report what it cost."""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:  # read by MKL when torch loads it, so only before the first torch import
    # MKL's allocator keeps every GEMM buffer it ever made: more peak RSS, no speed gained
    _os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from .api import CalibConfig, EvalConfig, compress, evaluate, load_compressed, run_pipeline, save
from .errors import LlmpressError, RecipeError, UnsupportedArchitecture, UserError
from .models import load
from .quant.args import QuantArgs
from .recipe import Recipe, Stage, load_recipe, stage

__version__ = "0.1.0"
__all__ = [
    "compress",
    "evaluate",
    "run_pipeline",
    "save",
    "load",
    "load_compressed",
    "CalibConfig",
    "EvalConfig",
    "QuantArgs",
    "Recipe",
    "Stage",
    "stage",
    "load_recipe",
    "LlmpressError",
    "UserError",
    "RecipeError",
    "UnsupportedArchitecture",
]
