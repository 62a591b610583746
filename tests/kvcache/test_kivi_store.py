"""The vectorized KIVI store is bit-identical to the per-group store it replaced (kept here
verbatim as the reference: a list of packed groups, each dequantized on its own), bytes
included, with eviction at group granularity."""

from __future__ import annotations

import pytest
import torch

from llmpress.kvcache.kivi import KIVIStore, Packed, _codes, dequantize_keys, quantize_keys
from llmpress.quant.pack import pack_codes, unpack_codes


# -- the per-group implementation before the store was vectorized (reference)
def _old_quant(x, dim, bits):
    qmax = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    s = ((hi - lo) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round((x - lo) / s), 0, qmax), s, lo


def _old_quantize_keys(k, bits):
    q, s, lo = _old_quant(k.float(), dim=-2, bits=bits)
    return Packed(codes=pack_codes(q.to(torch.int64), bits), scale=s.to(k.dtype), low=lo.to(k.dtype), n=k.shape[-1], bits=bits)


def _old_quantize_values(v, bits, group):
    B, H, T, D = v.shape
    q, s, lo = _old_quant(v.float().reshape(B, H, T, D // group, group), dim=-1, bits=bits)
    return Packed(codes=pack_codes(q.reshape(B, H, T, D).to(torch.int64), bits), scale=s.to(v.dtype), low=lo.to(v.dtype), n=D, bits=bits)


def _old_dequantize_keys(p, dtype):
    q = unpack_codes(p.codes, p.bits, p.n).to(torch.float32)
    return (q * p.scale.float() + p.low.float()).to(dtype)


def _old_dequantize_values(p, group, dtype):
    q = unpack_codes(p.codes, p.bits, p.n).to(torch.float32)
    B, H, T, D = q.shape
    return (q.reshape(B, H, T, D // group, group) * p.scale.float() + p.low.float()).reshape(B, H, T, D).to(dtype)


class OldKIVIStore:
    def __init__(self, *, bits, group, residual):
        self.bits, self.group, self.residual = bits, group, residual
        self.kq, self.vq, self.k, self.v = [], [], None, None

    @property
    def groups(self):
        return len(self.kq)

    def __len__(self):
        return len(self.kq) * self.group + (0 if self.k is None else self.k.shape[-2])

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        G = self.group
        while self.k.shape[-2] >= self.residual + G:
            self.kq.append(_old_quantize_keys(self.k[:, :, :G], self.bits))
            self.vq.append(_old_quantize_values(self.v[:, :, :G], self.bits, G))
            self.k, self.v = self.k[:, :, G:].contiguous(), self.v[:, :, G:].contiguous()

    def drop_oldest_groups(self, n):
        del self.kq[:n]
        del self.vq[:n]

    def full(self):
        dt = self.k.dtype
        ks = [_old_dequantize_keys(p, dt) for p in self.kq] + [self.k]
        vs = [_old_dequantize_values(p, self.group, dt) for p in self.vq] + [self.v]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def nbytes(self):
        res = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return res + sum(p.nbytes() for p in self.kq) + sum(p.nbytes() for p in self.vq)


# -- the comparison
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,residual", [(8, 16), (16, 0), (32, 32), (64, 128)])
def test_vectorized_store_is_bit_identical_to_the_per_group_store(bits, dtype, group, residual):
    g = torch.Generator().manual_seed(bits * 1000 + group + residual)
    D = 64
    scale = torch.linspace(0.1, 8, D)  # outlier channels
    new, old = KIVIStore(bits=bits, group=group, residual=residual), OldKIVIStore(bits=bits, group=group, residual=residual)
    # a prefill of several groups, single tokens, chunks, and evictions at group granularity
    steps = [300, 1, 1, 5, 1, group, 3 * group + 1] + [1] * (group + 2) + [40, 1]
    drops = {3: 2, 8: 1, 10: 0, len(steps) - 2: 10**6}  # step -> groups to drop before appending
    for i, t in enumerate(steps):
        if i in drops:
            new.drop_oldest_groups(drops[i]), old.drop_oldest_groups(drops[i])
        k = (torch.randn(2, 3, t, D, generator=g) * scale).to(dtype)
        v = torch.randn(2, 3, t, D, generator=g).to(dtype)
        new.append(k, v), old.append(k, v)
        assert len(new) == len(old) and new.groups == old.groups and new.nbytes() == old.nbytes(), i
        (kn, vn), (ko, vo) = new.full(), old.full()
        assert kn.dtype == ko.dtype == dtype and torch.equal(kn, ko) and torch.equal(vn, vo), i
    assert new.groups == old.groups > 0  # the last steps refilled after dropping everything


def test_the_store_holds_only_codes_scales_minima_and_the_residual():
    store = KIVIStore(bits=2, group=32, residual=64)
    kv = torch.randn(1, 2, 1000, 64, dtype=torch.bfloat16)
    store.append(kv, kv)
    assert store.groups == 29 and store.k.shape[-2] == 1000 - 29 * 32
    B, H, D, N = 1, 2, 64, 29
    codes = 2 * B * H * N * 32 * (D // 32 * 2) * 4  # int32 words, K and V
    kscales = 2 * B * H * N * D * 2  # scale and min per (group, channel), bf16
    vscales = 2 * B * H * N * 32 * (D // 32) * 2  # scale and min per (token, channel group)
    assert store.nbytes() == codes + kscales + vscales + 2 * store.k.numel() * 2
    store.drop_oldest_groups(20)
    assert store.groups == 9 and store.kq.codes.untyped_storage().nbytes() == store.kq.codes.numel() * 4  # really released
    assert len(store) == 9 * 32 + 1000 - 29 * 32


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_codes_unpack_as_the_generic_unpacker(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (2, 3, 5, 70), generator=g)
    p = Packed(codes=pack_codes(q, bits), scale=torch.ones(1), low=torch.zeros(1), n=70, bits=bits)
    assert torch.equal(_codes(p), q.float())


def test_keys_of_several_groups_get_one_scale_row_each():
    k = torch.randn(1, 2, 96, 64)
    p = quantize_keys(k, 4, 32)
    assert p.scale.shape == (1, 2, 3, 64)
    parts = [dequantize_keys(quantize_keys(k[:, :, i : i + 32], 4), k.dtype) for i in (0, 32, 64)]
    assert torch.equal(dequantize_keys(p, k.dtype), torch.cat(parts, dim=-2))
