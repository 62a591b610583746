"""Import every module that registers a method (fills ``registry.METHODS``)."""
from .quant import rtn  # noqa: F401
from .quant import gptq  # noqa: F401
from .prune import sparsegpt  # noqa: F401
from .transform import rotate  # noqa: F401  (quarot, kv_quant)
from .transform import duquant  # noqa: F401
from .transform import spinquant  # noqa: F401
from .transform import smooth  # noqa: F401  (smoothquant)
from .quant import awq, outliers  # noqa: F401
from .prune import magnitude, owl, wanda  # noqa: F401
from .runtime import llm_int8  # noqa: F401
