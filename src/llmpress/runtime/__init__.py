"""Runtime modules used by compressed models."""

from .act_quant import ActQuantLinear

__all__ = ["ActQuantLinear"]
