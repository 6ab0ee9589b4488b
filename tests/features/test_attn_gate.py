"""features/attn_gate.py (--attn_gate): every head at half strength at init, and the gate by hand."""
import torch

import train_gpt as tg
from conftest import attention_pair, tokens_with_docs


def test_attention_gate_halves_the_heads_at_init_and_matches_a_hand_gate():
    plain, gated = attention_pair("--attn_gate=true")
    assert gated.out_gate.weight.shape == (2, 12) and not gated.out_gate.weight.any()
    with torch.no_grad():
        plain.c_proj.weight.normal_(0, 0.1)
        gated.c_proj.weight.copy_(plain.c_proj.weight)
    x = tg.norm(torch.randn(1, 256, 128))
    mask = tg.dense_attention_mask(tokens_with_docs(256, [0]), 2)
    with torch.no_grad():
        torch.testing.assert_close(gated(x, None, mask), 0.5 * plain(x, None, mask))
        gated.out_gate.weight.normal_()
        proj, plain.c_proj = plain.c_proj, torch.nn.Identity()
        y = plain(x, None, mask).view(1, 256, 2, 64)  # the ungated per-head outputs
        gate = torch.stack([torch.sigmoid(x[0, :, :12] @ gated.out_gate.weight[h]) for h in range(2)], -1)
        torch.testing.assert_close(gated(x, None, mask), proj((y * gate[None, :, :, None]).flatten(-2)))
