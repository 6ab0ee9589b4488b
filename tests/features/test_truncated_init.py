"""Truncated-normal init (--weight_init=truncated, features/truncated_init.py): which matrices the recipe draws from
its uniform (and so which it redraws), and the redraw's std and cut."""
import pytest
import torch

import features.truncated_init as truncated_init
import train_gpt as tg
from conftest import smoke_args

ATTN_LAYERS, L = 3, 4  # the smoke preset: four blocks, block 2 without attention
MLA = ["--mla_kv_rank=32", "--mla_q_rank=48", "--mla_rope_dim=16"]
MOE_SWIGLU = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1", "--mlp_act=swiglu"]
WEIGHT_INIT_CONFIGS = [[], ["--n_kv_heads=1"], MLA, MOE_SWIGLU, ["--mlp_act=swiglu"], ["--tie_embeddings=true"]]


@pytest.mark.parametrize("flags", WEIGHT_INIT_CONFIGS, ids=lambda f: "+".join(x[2:] for x in f[:1] + f[3:]) or "none")
def test_recipe_matrices_are_the_uniform_draws(flags):
    """The matrices --weight_init=truncated redraws are exactly those drawn from the recipe's uniform(+-sqrt(3) * 0.5
    / sqrt(fan_in)), fan_in = the last dim, in every architecture; everything else of >= 2 dims (embeddings,
    zero-initialized projections) is left alone."""
    model = tg.build_model(smoke_args(*flags))
    chosen = {id(p) for p in truncated_init.recipe_matrices(model)}
    assert chosen
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        s = 0.5 * p.size(-1) ** -0.5
        is_uniform = bool(p.abs().max() <= 3 ** 0.5 * s) and abs(p.std().item() / s - 1) < 0.1
        assert (id(p) in chosen) == is_uniform, name


def test_truncated_init_keeps_the_std_and_cuts_at_two_sigma():
    flags = ["--mlp_act=swiglu", "--n_kv_heads=1"]
    torch.manual_seed(0)
    uniform = tg.GPT(smoke_args(*flags))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(uniform.parameters(), tg.build_model(smoke_args(*flags)).parameters()))
    torch.manual_seed(0)
    model = tg.build_model(smoke_args(*flags, "--weight_init=truncated"))
    redrawn = {id(p) for p in truncated_init.recipe_matrices(model)}
    assert len(redrawn) == 2 * ATTN_LAYERS + L  # GQA's q and kv, SwiGLU's merged fc (projections start at zero)
    for (name, p), u in zip(model.named_parameters(), uniform.parameters()):
        if id(p) not in redrawn:
            assert torch.equal(p, u), name  # the same draw: only the recipe matrices are redrawn
            continue
        s = 0.5 * p.size(-1) ** -0.5  # the uniform's std, kept
        sigma = s / truncated_init.TRUNC2_STD  # the underlying normal, cut at 2 sigma = 2.27 s
        assert abs(p.std().item() / s - 1) < 0.02, name
        assert 0.97 * 2 * sigma < p.abs().max() <= 2 * sigma, name
        tail = (p.abs() > 3 ** 0.5 * s).float().mean().item()  # beyond the uniform's bound: 8.6% expected
        assert 0.07 < tail < 0.10, (name, tail)
    assert abs(truncated_init.TRUNC2_STD - 0.8796) < 1e-4  # std of N(0, 1) cut to [-2, 2]
    z = torch.nn.init.trunc_normal_(torch.empty(10 ** 6), a=-2, b=2, generator=torch.Generator().manual_seed(0))
    assert abs(z.std().item() - truncated_init.TRUNC2_STD) < 2e-3
