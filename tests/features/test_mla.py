"""features/mla.py (--mla_kv_rank): the cache holds the latent and the shared rotary key, query compression
is optional, only the rope dims rotate. Its shapes, causality and parameter count with every other flag:
tests/core/test_arch_flags.py."""
import torch

import features.mla as mla_feature
import train_gpt as tg
from conftest import smoke_args, smoke_model, tokens_with_docs

V, VP, D, H, HD, L, HIDDEN = 50257, 50304, 128, 2, 64, 4, 512  # the smoke preset; block 2 has no attention

MLA = ["--mla_kv_rank=32", "--mla_q_rank=48", "--mla_rope_dim=16"]
MOE = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1"]


def test_mla_cache_holds_the_latent_and_the_shared_rotary_key():
    model = smoke_model(*MLA)
    attn = model.blocks[0].attn
    assert isinstance(attn, mla_feature.LatentAttention) and isinstance(attn.q_proj, mla_feature.LowRankLinear)
    assert attn.kv_cache_floats_per_token() == 32 + 16
    cached = {}
    attn.kv_down.register_forward_hook(lambda m, i, o: cached.__setitem__("latent", o.shape))
    attn.k_rope.register_forward_hook(lambda m, i, o: cached.__setitem__("rope", o.shape))
    with torch.no_grad():
        model(tokens_with_docs(256, [0, 100]))
    # everything K and V are computed from, per earlier token: the latent and the one rotary key part
    assert cached["latent"][-1] + cached["rope"][-1] == attn.kv_cache_floats_per_token()
    assert "KV cache 144 floats/token" in tg.describe_model(model, smoke_args(*MLA))  # 3 attention layers x 48


def test_mla_without_query_compression_and_suggested_768_shapes():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--mla_kv_rank=256", "--mla_q_rank=384", "--mla_rope_dim=64"])
    tg.check_config(args, 1)
    attn = mla_feature.LatentAttention(args, 1024)
    assert attn.kv_cache_floats_per_token() == 320  # vs 2 * 768 = 1536 for the baseline's MHA
    assert attn.q_proj.up.weight.shape == (6 * (128 + 64), 384) and attn.kv_up.shape == (2, 768, 256)
    assert isinstance(mla_feature.LatentAttention(smoke_args("--mla_kv_rank=32"), 512).q_proj, tg.CastedLinear)


def test_mla_rotates_only_the_rope_dims():
    attn = mla_feature.LatentAttention(smoke_args(*MLA), 512)
    x = torch.randn(1, 8, H, HD + 16)
    out = attn.rope(x)
    torch.testing.assert_close(out[..., :HD], x[..., :HD])
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: no rotation
    assert not torch.allclose(out[:, 3, :, HD:], x[:, 3, :, HD:])
    assert (attn.rotary.cos[5] != 1).all()  # every rope pair has a non-zero frequency
