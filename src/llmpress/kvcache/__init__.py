"""KV-cache policies as transformers caches: KIVI quantization, StreamingLLM attention sinks,
H2O heavy hitters (docs/kvcache.md)."""

from .build import KVPolicy, build_cache, parse_policy

__all__ = ["KVPolicy", "build_cache", "parse_policy"]
