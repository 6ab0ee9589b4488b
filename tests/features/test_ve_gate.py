"""features/ve_gate.py (--ve_gate): the gate is one at init and matches a hand gate. Its Adam group and bf16
storage under the record's dtypes: tests/core/test_frontier_fidelity.py."""
import torch

import features.ve_gate as ve_gate_feature
import train_gpt as tg
from conftest import attention_pair, smoke_args, tokens_with_docs


def test_value_embedding_gate_is_one_at_init_and_matches_a_hand_gate():
    plain, gated = attention_pair("--ve_gate=true")
    assert gated.ve_gate.weight.shape == (2, 12)
    with torch.no_grad():
        plain.c_proj.weight.normal_(0, 0.1)
        gated.c_proj.weight.copy_(plain.c_proj.weight)
    x, ve = tg.norm(torch.randn(1, 256, 128)), torch.randn(1, 256, 128)
    mask = tg.dense_attention_mask(tokens_with_docs(256, [0]), 2)
    with torch.no_grad():
        torch.testing.assert_close(gated(x, ve, mask), plain(x, ve, mask))  # 2 sigmoid(0) = 1
        gated.ve_gate.weight.normal_()
        w = gated.ve_gate.weight
        g = torch.stack([2 * torch.sigmoid(torch.cat([x[0, :, :6], ve[0, :, :6]], -1) @ w[h]) for h in range(2)], -1)
        scaled = (ve.view(1, 256, 2, 64) * g[None, :, :, None]).flatten(-2)
        torch.testing.assert_close(gated(x, ve, mask), plain(x, scaled, mask))
    model = tg.build_model(smoke_args("--ve_gate=true"))  # value embeddings on blocks 0 and 3 (block 2: no attn)
    assert [isinstance(b.attn.ve_gate, ve_gate_feature.ValueEmbedGate) for b in model.blocks if b.attn is not None] == \
        [True, False, True]
