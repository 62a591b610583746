"""Cache layers with a policy: what is kept (all, attention sinks + window, heavy hitters +
recent window), how it is stored (model precision or KIVI codes) and at which rotary
positions the kept keys sit.

Positions. With ``positions="cache"`` (StreamingLLM) the kept keys sit at consecutive
positions ending at the current query's, i.e. the distance between a query and a key is their
distance *inside the cache*, never more than the cache holds: a stream can run past the
model's training length. transformers gives each new token its absolute position p; a key at
cache index j of L is kept at ``p - (L - 1 - j)``. Between evictions nothing moves (p and L
grow together); when tokens are evicted the keys before them move forward by the number
evicted (:func:`llmpress.kvcache.rope.shift_keys`, exact). ``positions="original"`` keeps
every key at the position it was computed at (H2O's setting).

Masks. The mask transformers builds from ``get_mask_sizes`` is causal over ``kv_length``
keys whose positions start at ``kv_offset``: with ``kv_offset = seen - cached`` the cached
keys all precede the new tokens and the new tokens are causal among themselves, whatever
was evicted before.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .kivi import KIVIStore
from .rope import shift_keys


class PolicyLayer(DynamicLayer):
    """One attention layer's cache. ``sinks``/``window``: keep the first ``sinks`` tokens and
    the last ``window`` (None: keep all); ``heavy``: with H2O, also the ``heavy`` tokens of
    largest accumulated attention (per key/value head); ``kivi``: store in KIVI codes."""

    is_croppable = False

    def __init__(self, *, sinks: int = 0, window: int | None = None, heavy: int = 0, kivi: dict | None = None,
                 positions: str = "original", inv_freq: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.sinks, self.window, self.heavy = sinks, window, heavy
        self.kivi = kivi
        self.positions = positions
        self.inv_freq = inv_freq
        self.seen = 0  # tokens that went through this layer
        self.store: KIVIStore | None = None  # KIVI: the window part (sinks stay in precision)
        self.sink_k: torch.Tensor | None = None
        self.sink_v: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # H2O: accumulated attention per cached token [B, Hkv, T]
        self.peak_bytes = 0

    # -- what transformers asks
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.kivi is not None:
            self.store = KIVIStore(**self.kivi)

    def get_seq_length(self) -> int:
        return self.seen

    def cached(self) -> int:
        if not self.is_initialized:
            return 0
        if self.store is not None:
            return (0 if self.sink_k is None else self.sink_k.shape[-2]) + len(self.store)
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # asked before ``update`` of the same step, which evicts first: the size after that eviction
        c = self._after_eviction()
        return c + query_length, self.seen - c

    def _after_eviction(self) -> int:
        c = self.cached()
        if self.window is None:
            return c
        if self.store is not None:
            return c - self._groups_to_drop() * self.store.group
        return min(c, self.sinks + self.heavy + self.window)

    def _groups_to_drop(self) -> int:
        return max(0, min((len(self.store) - self.window) // self.store.group, self.store.groups))

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.sinks + self.window + self.heavy

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store is not None:
            self.seen += key_states.shape[-2]
            return self._update_kivi(key_states, value_states)
        # evict first (by the scores of the steps so far), then append: the new tokens see the
        # kept ones and each other
        self._evict()
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.heavy:
            z = torch.zeros(*key_states.shape[:2], key_states.shape[-2], dtype=torch.float32, device=key_states.device)
            self.scores = z if self.scores is None else torch.cat([self.scores, z], dim=-1)
        self._note_bytes()
        return self.keys, self.values

    # -- eviction
    def _evict(self) -> None:
        if self.window is None or self.keys.numel() == 0:
            return
        T = self.keys.shape[-2]
        budget = self.sinks + self.heavy + self.window
        if T <= budget:
            return
        if not self.heavy:  # sinks + window: positions [0, sinks) and the last `window`
            keep = torch.cat([torch.arange(self.sinks), torch.arange(T - self.window, T)]).to(self.keys.device)
            self._keep_same(keep)
            return
        # H2O: the recent window always; of the older tokens (sinks too) the `heavy` of largest score, per head
        old = T - self.window
        top = self.scores[..., :old].topk(min(self.heavy + self.sinks, old), dim=-1).indices.sort(dim=-1).values  # [B, H, k]
        recent = torch.arange(old, T, device=self.keys.device).expand(*top.shape[:2], self.window)
        self._keep_per_head(torch.cat([top, recent], dim=-1))

    def _keep_same(self, keep: torch.Tensor) -> None:
        T = self.keys.shape[-2]
        if self.positions == "cache":
            delta = self._moves(keep, T).to(self.keys.device)
            self.keys = self.keys[:, :, keep]
            self.keys = shift_keys(self.keys, delta, self.inv_freq) if bool((delta != 0).any()) else self.keys
        else:
            self.keys = self.keys[:, :, keep]
        self.values = self.values[:, :, keep]
        if self.scores is not None:
            self.scores = self.scores[..., keep]

    def _keep_per_head(self, keep: torch.Tensor) -> None:
        """``keep`` [B, H, k] sorted indices per key/value head."""
        T = self.keys.shape[-2]
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        newk = self.keys.gather(2, idx)
        if self.positions == "cache":
            newk = shift_keys(newk, self._moves(keep, T), self.inv_freq)
        self.keys, self.values = newk, self.values.gather(2, idx)
        self.scores = self.scores.gather(2, keep)

    @staticmethod
    def _moves(keep: torch.Tensor, T: int) -> torch.Tensor:
        """How far each kept key moves forward when the tokens not in ``keep`` (sorted, along the
        last dimension) leave a cache of T: the number of evicted tokens after it."""
        after_kept = keep.shape[-1] - 1 - torch.arange(keep.shape[-1], device=keep.device)  # kept tokens after each
        after_all = (T - 1) - keep  # tokens after each
        return after_all - after_kept

    # -- KIVI storage (eviction composes at the store's group granularity; sinks stay in precision)
    def _update_kivi(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sinks and (self.sink_k is None or self.sink_k.shape[-2] < self.sinks):
            have = 0 if self.sink_k is None else self.sink_k.shape[-2]
            n = min(self.sinks - have, k.shape[-2])
            self.sink_k = k[:, :, :n] if self.sink_k is None else torch.cat([self.sink_k, k[:, :, :n]], dim=-2)
            self.sink_v = v[:, :, :n] if self.sink_v is None else torch.cat([self.sink_v, v[:, :, :n]], dim=-2)
            k, v = k[:, :, n:], v[:, :, n:]
        if self.window is not None:  # whole quantized groups beyond the window leave first
            G = self.store.group
            groups = self._groups_to_drop()
            if groups:
                self.store.drop_oldest_groups(groups)
                if self.positions == "cache" and self.sink_k is not None:
                    self.sink_k = shift_keys(self.sink_k, torch.tensor(groups * G), self.inv_freq)
        if k.shape[-2]:
            self.store.append(k, v, pos=self.seen - k.shape[-2])  # the rotary position of k's first token
        kk, vv = self.store.full() if len(self.store) else (k[:, :, :0], v[:, :, :0])
        if self.sink_k is not None:
            kk, vv = torch.cat([self.sink_k, kk], dim=-2), torch.cat([self.sink_v, vv], dim=-2)
        self._note_bytes()
        return kk, vv

    # -- accounting
    def nbytes(self) -> int:
        """Bytes this layer holds for K and V (KIVI: codes, scales and minima; H2O scores excluded)."""
        if not self.is_initialized:
            return 0
        if self.store is not None:
            sinks = 0 if self.sink_k is None else 2 * self.sink_k.numel() * self.sink_k.element_size()
            return sinks + self.store.nbytes()
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def _note_bytes(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    # -- H2O: what the attention gave each cached key
    def observe(self, probs: torch.Tensor) -> None:
        """``probs`` [B, Hq, q, T]: attention probabilities of this step over the cached keys
        (as returned by ``update``). Summed over queries and over the query heads that share a
        key/value head."""
        if self.scores is None:
            return
        B, Hq, _, T = probs.shape
        Hkv = self.scores.shape[1]
        s = probs.float().sum(2).reshape(B, Hkv, Hq // Hkv, T).sum(2)
        n = min(T, self.scores.shape[-1])
        self.scores[..., -n:] += s[..., -n:]


class SlidingKIVILayer(PolicyLayer):
    """A sliding-window attention layer (gemma3's local layers) stored in KIVI codes: the last
    ``window`` tokens (the model's sliding window) kept, evicted a quantized group at a time,
    so it holds between ``window`` and ``window + G`` tokens; the model's sliding mask (built
    from this layer's mask sizes, as for transformers' own sliding layer) hides the extra ones.
    Keys stay at their original positions."""

    is_sliding = True
