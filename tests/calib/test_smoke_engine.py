import torch

from conftest import random_windows, tiny_gemma3, tiny_llama
from llmpress import compress, stage
from llmpress.quant import QuantArgs


def test_rtn_runs_data_free_and_changes_weights():
    m = tiny_llama()
    w0 = m.model.layers[0].mlp.down_proj.weight.clone()
    rep = compress(m, [stage("rtn", weights=QuantArgs(bits=4, group_size=32))])
    w1 = m.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w0, w1)
    assert rep.compressed["quantized_linears"] == 14
    assert abs(rep.bits_per_weight - (4 + 16 / 32)) < 1e-9
