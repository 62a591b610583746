"""Import every module that registers a method (fills ``registry.METHODS``)."""
from .quant import rtn  # noqa: F401
from .quant import gptq  # noqa: F401
from .prune import sparsegpt  # noqa: F401
