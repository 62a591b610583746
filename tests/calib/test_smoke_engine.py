import torch
from conftest import tiny_llama

from llmpress import compress, stage
from llmpress.quant import QuantArgs, fake_quantize


def test_rtn_runs_data_free_and_sets_every_block_linear_to_its_grid():
    args = QuantArgs(bits=4, group_size=32)
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rep = compress(m, [stage("rtn", weights=args)])
    after = dict(m.named_parameters())
    linears = [n for n in before if ".layers." in n and n.endswith("_proj.weight")]
    assert len(linears) == 14
    for n, w0 in before.items():  # each block linear is exactly its round-to-nearest grid; the rest is untouched
        want = fake_quantize(w0, args) if n in linears else w0
        assert torch.equal(after[n], want), n
    assert rep.compressed["quantized_linears"] == 14
    assert abs(rep.bits_per_weight - (4 + 16 / 32)) < 1e-9
