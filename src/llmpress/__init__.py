"""llmpress: compress causal language models after training, and report what it cost."""
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
