"""Import every module that registers a method (fills ``registry.METHODS``)."""
from .quant import rtn  # noqa: F401
