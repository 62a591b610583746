"""Sequential calibration: statistics accumulators and the block-by-block engine."""

from .accumulators import ACCUMULATORS, Accumulator, HessianAccumulator, InputChannelStats, TokenAbsMax

__all__ = ["ACCUMULATORS", "Accumulator", "HessianAccumulator", "InputChannelStats", "TokenAbsMax"]
