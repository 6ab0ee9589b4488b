"""features/sublayer.py (--sublayer_lambdas, r45): the sub-layer block by hand, and at resid_lambda_init 1 the
r21 block bit for bit. With the MUDD gates that weigh its x0 and bigram terms: tests/features/test_mudd_gates.py;
its lambdas read in bf16 under the record's dtypes: tests/core/test_frontier_fidelity.py."""
import torch

import features.sublayer as sublayer_feature
import train_gpt as tg
from conftest import live_model, smoke_model

V = "--vocab_size=1024"
SUBLAYER = ["--sublayer_lambdas=true", "--resid_lambda_init=1.1"]


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def test_sublayer_block_by_hand():
    """x <- r_a x + p_a Attn(RMSNorm(x)) + l x0, then x <- r_m x + p_m MLP(RMSNorm(x)); r starts at sqrt(1.1)."""
    model = live_model(V, *SUBLAYER)
    block = model.blocks[0]
    assert isinstance(block, sublayer_feature.SublayerBlock) and type(block.add_bigram) is tg.PassThrough
    torch.testing.assert_close(block.resid_lambdas.detach(), torch.tensor([1.1 ** 0.5] * 2))  # before live_model:
    torch.testing.assert_close(block.post_lambdas.detach(), torch.tensor([1.0, 1.0]))  # non-zero, untouched
    with torch.no_grad():
        block.resid_lambdas.copy_(torch.tensor([0.9, 1.2]))
        block.post_lambdas.copy_(torch.tensor([1.3, 0.7]))
    x, x0 = torch.randn(1, 256, 128), torch.randn(1, 256, 128)
    mask = model.attention_masks(tokens(256), 2)["L"]
    ve = torch.randn(1, 256, 128)
    with torch.no_grad():
        h = 0.9 * x + 1.3 * block.attn(tg.norm(x), ve, mask) + block.add_x0.lam * x0
        expected = 1.2 * h + 0.7 * block.mlp(tg.norm(h))
        torch.testing.assert_close(block(x, x0, ve, mask, {}), expected)
        free = model.blocks[2]  # attention-free: its MLP sub-layer only, no x0 term
        assert free.attn is None and free.add_x0 is None and free.resid_lambdas.shape == free.post_lambdas.shape == (1,)
        torch.testing.assert_close(free(x, x0, None, mask, {}), free.resid_lambdas[0] * x +
                                   free.post_lambdas[0] * free.mlp(tg.norm(x)))


def test_sublayer_form_at_init_is_the_r21_block_bit_for_bit():
    """With resid_lambda_init 1 (r = 1, p = 1, l = 0) both forms compute x + Attn, then + MLP: same draw, same
    logits, exactly."""
    x = tokens(256)
    with torch.no_grad():
        assert torch.equal(smoke_model(V, "--sublayer_lambdas=true")(x), smoke_model(V)(x))
