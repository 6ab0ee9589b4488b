"""Attention-input skips (--attn_input_skips, features/attn_input_skips.py; frontier recipe 3.3, r77): a block whose
attention reads an earlier block's output, run by hand. With the MUDD gates and sub-layer lambdas:
tests/features/test_mudd_gates.py; its flag checks: tests/core/test_frontier_model.py."""
import torch

import features.attn_input_skips as attn_input_skips_feature
import train_gpt as tg
from conftest import live_model

V = "--vocab_size=1024"


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def test_attention_input_skip_reads_the_earlier_output():
    """--attn_input_skips=0:1: block 1's attention reads RMSNorm(block 0's output); its MLP and residual are its
    own. Running block 1 by hand with that input reproduces the model."""
    model = live_model(V, "--attn_input_skips=0:1")
    assert isinstance(model.blocks[1].attn_input, attn_input_skips_feature.BlockOutput) and 0 in model.kept_outputs
    x = tokens(256)
    masks = model.attention_masks(x, model.default_window_blocks)
    with torch.no_grad():
        x0 = tg.norm(model.embed(x)[None])
        c0 = model.blocks[0](x0, x0, model.value_embeds[0](x)[None], masks["L"])
        b1 = model.blocks[1]
        b1.lambdas.copy_(torch.tensor([1.2, 0.4]))  # so that block 1's residual differs from c0
        h = b1.lambdas[0] * c0 + b1.lambdas[1] * x0
        h = h + b1.attn(tg.norm(c0), None, masks["S"])  # c0, not h
        h = h + b1.mlp(tg.norm(h))
        plain = live_model(V)
        plain.load_state_dict(model.state_dict())
        plain_h = plain.blocks[1](c0, x0, None, masks["S"])
        assert not torch.allclose(h, plain_h)
        outputs = {0: c0}
        torch.testing.assert_close(b1(c0, x0, None, masks["S"], outputs), h)
