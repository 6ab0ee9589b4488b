"""Architecture-ablation flags (issue 6): GQA, MLA, MoE, mlp_act, NEFTune, dropout, tied embeddings. Per flag: shapes,
causality, parameter-count formula, config errors; GQA vs baseline attention; train-only noise; and short smoke runs
with the flags combined. MLA's and MoE's own behaviour: tests/features/test_mla.py, tests/features/test_moe.py."""
import math

import pytest
import torch

import features.moe as moe_feature
import train_gpt as tg
from conftest import smoke_args, smoke_model, tokens_with_docs, val_losses

V, VP, D, H, HD, L, HIDDEN = 50257, 50304, 128, 2, 64, 4, 512  # the smoke preset; block 2 has no attention
ATTN_LAYERS, NVE = 3, 1
BASELINE = 20_025_616  # smoke-preset parameter count

MLA = ["--mla_kv_rank=32", "--mla_q_rank=48", "--mla_rope_dim=16"]
MOE = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1"]
MOE_SWIGLU = [*MOE, "--mlp_act=swiglu"]


# --- every flag: shapes, causality, parameter count ---------------------------------------------------------------

def expected_params(flags):
    attn_base, mlp_base = 4 * D * D + 2, 2 * D * HIDDEN
    if "--n_kv_heads=1" in flags:  # q (D, D), kv (2, HD, D), c_proj, lambdas; value tables HD wide
        return BASELINE + ATTN_LAYERS * (2 * D * D + 2 * HD * D + 2 - attn_base) + NVE * V * (HD - D)
    if flags == MLA:  # q latent 48, kv latent 32, rope 16
        mla = 48 * D + H * (HD + 16) * 48 + 32 * D + 16 * D + 2 * D * 32 + D * D + 2
        return BASELINE + ATTN_LAYERS * (mla - attn_base)
    if flags == MOE:  # router + 5 experts of width 512 / 3 -> 192
        return BASELINE + L * (4 * D + 2 * 5 * 192 * D - mlp_base)
    if flags == MOE_SWIGLU:  # width 2/3 * 512 / 3 -> 128; c_fc twice as wide ([gate | up])
        return BASELINE + L * (4 * D + 5 * (2 * 128 * D + D * 128) - mlp_base)
    if "--mlp_act=swiglu" in flags:  # hidden 2/3 * 512 rounded to 384
        return BASELINE + L * (3 * D * 384 - mlp_base)
    if "--mlp_act=learned_gelu" in flags:
        return BASELINE + L * 2 * HIDDEN
    if "--tie_embeddings=true" in flags:  # the embedding grows to VP rows, the head's VP x D are gone
        return BASELINE - V * D
    return BASELINE


FLAGS = [["--n_kv_heads=1"], MLA, MOE, MOE_SWIGLU, ["--mlp_act=gelu"], ["--mlp_act=swiglu"], ["--mlp_act=learned_gelu"],
         ["--neftune_alpha=5"], ["--dropout=0.1"], ["--tie_embeddings=true"]]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "moe_experts+swiglu" if f == MOE_SWIGLU else f[0][2:])
def test_flag_shapes_causality_and_parameter_count(flags):
    model = smoke_model(*flags)
    assert tg.count_params(model) == expected_params(flags)
    groups = tg.param_groups(model, smoke_args(*flags))
    assert sum(p.numel() for g in groups.values() for p in g) == tg.count_params(model)
    x = tokens_with_docs(256, [0, 100])
    loss = model(x[:-128], x[1:-127])  # training mode
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
        y = x.clone()
        y[200:] = torch.randint(0, 50000, (56,), generator=torch.Generator().manual_seed(1))
        changed = model(y)
    assert logits.shape == (256, VP) and logits.dtype == torch.float32
    torch.testing.assert_close(changed[:200], logits[:200])  # earlier positions never see later tokens
    assert not torch.allclose(changed[200:], logits[200:])
    summary = tg.describe_model(model, smoke_args(*flags))
    assert f"= {tg.count_params(model):,}" in summary and "FLOPs/token" in summary


def test_defaults_build_the_baseline_modules():
    model = tg.build_model(smoke_args())
    block = model.blocks[0]
    assert type(block.attn) is tg.CausalSelfAttention and type(block.mlp) is tg.MLP
    assert isinstance(block.mlp.act, tg.ReLU2) and isinstance(block.dropout, torch.nn.Identity)
    assert isinstance(model.embed_noise, torch.nn.Identity) and isinstance(model.lm_head, tg.CastedLinear)
    assert not moe_feature.moe_layers(model) and model.aux_loss() == 0
    assert all(".rotary." in name for name, _ in model.named_buffers())
    assert tg.count_params(model) == BASELINE


# --- GQA ----------------------------------------------------------------------------------------------------------

def test_gqa_with_all_heads_equals_baseline_attention():
    torch.manual_seed(0)
    gqa = tg.GroupedQueryAttention(D, H, H, 0.12, 512)
    base = tg.CausalSelfAttention(D, H, 0.12, 512)
    with torch.no_grad():
        base.qkv_w.copy_(torch.stack([gqa.q_w, *gqa.kv_w]))
        base.c_proj.weight.normal_(0, 0.05)
        gqa.c_proj.weight.copy_(base.c_proj.weight)
    x, ve = torch.randn(1, 256, D), torch.randn(1, 256, D)
    mask = tg.dense_attention_mask(tokens_with_docs(256, [0, 100]), 2)
    torch.testing.assert_close(gqa(x, ve, mask), base(x, ve, mask), rtol=1e-5, atol=1e-6)
    assert gqa.kv_cache_floats_per_token() == base.kv_cache_floats_per_token() == 2 * D


def test_gqa_shares_each_kv_head_across_its_query_group():
    torch.manual_seed(0)
    heads, kv, hd = 4, 2, D // 4
    gqa = tg.GroupedQueryAttention(D, heads, kv, 0.12, 512)
    base = tg.CausalSelfAttention(D, heads, 0.12, 512)
    rep = lambda w: w.view(kv, hd, -1).repeat_interleave(heads // kv, 0).flatten(0, 1)  # head h uses kv h // 2
    with torch.no_grad():
        base.qkv_w.copy_(torch.stack([gqa.q_w, rep(gqa.kv_w[0]), rep(gqa.kv_w[1])]))
        base.c_proj.weight.normal_(0, 0.05)
        gqa.c_proj.weight.copy_(base.c_proj.weight)
    x, ve = torch.randn(1, 256, D), torch.randn(1, 256, kv * hd)
    mask = tg.dense_attention_mask(tokens_with_docs(256, [0, 100]), 2)
    ve_per_head = ve.view(1, 256, kv, hd).repeat_interleave(heads // kv, dim=2).flatten(2)
    torch.testing.assert_close(gqa(x, ve, mask), base(x, ve_per_head, mask), rtol=1e-5, atol=1e-6)
    assert gqa.kv_cache_floats_per_token() == 2 * kv * hd


# --- MLA ----------------------------------------------------------------------------------------------------------


# --- MoE ----------------------------------------------------------------------------------------------------------


# --- weight_init: tests/features/test_truncated_init.py; NEFTune, dropout: test_neftune.py, test_dropout.py ---------

# --- mlp_act, tied embeddings -------------------------------------------------------------------------------------

def test_swiglu_matches_dense_parameters_at_768():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--mlp_act=swiglu"])
    swiglu, dense = tg.SwiGLUMLP(args), tg.MLP(tg.Hyperparameters())
    assert tg.swiglu_hidden(args) == 2048 and tg.count_params(swiglu) == tg.count_params(dense) == 2 * 768 * 3072


# --- config errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--n_kv_heads=3"], "valid values: 0 \\(= num_heads\\), 1, 2"),
    (["--mla_kv_rank=32", "--n_kv_heads=1"], "alternatives"),
    (["--mla_kv_rank=32", "--mla_rope_dim=15"], "must be even"),
    (["--mla_q_rank=32"], "needs --mla_kv_rank"),
    (["--mlp_act=silu"], "valid values: relu2, gelu, swiglu, learned_gelu"),
    (["--moe_experts=4", "--moe_balance=loss"], "valid values: aux, bias"),
    (["--moe_experts=4", "--moe_topk=5"], "valid values: 1..moe_experts=4"),
    (["--moe_experts=4", "--ks_mlp=both"], "experts factorize only as --kron_mlp=both"),
    (["--moe_experts=4", "--kron_mlp=fc"], "experts factorize only as --kron_mlp=both"),
    (["--moe_experts=4", "--moe_shared=1", "--kron_mlp=both"],  # width 192: c_fc (12, 16, 16, 8)
     "c_fc factors .* strides \\{'rank_x_m1': 12\\}.* pick --moe_hidden"),
    (["--moe_experts=4", "--mlp_act=learned_gelu"], "relu2, gelu or swiglu"),
    (["--moe_experts=4", "--mlp_act=swiglu", "--kron_mlp=both", "--moe_hidden=256"], "alternatives"),
    (["--weight_init=normal"], "valid values: uniform, truncated"),
    (["--moe_experts=4", "--moe_hidden=100"], "multiples of 8"),
    (["--mlp_act=swiglu", "--kron_mlp=fc"], "alternatives"),
    (["--dropout=1"], "must be in \\[0, 1\\)"),
    (["--neftune_alpha=-1"], "must be >= 0"),
])
def test_bad_architecture_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


# --- smoke training -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--n_kv_heads=1", "--mlp_act=learned_gelu", "--dropout=0.1", "--neftune_alpha=5"],
    [*MLA, "--mlp_act=swiglu"],
    ["--tie_embeddings=true", *MOE, "--moe_balance=bias", "--mlp_act=gelu"],
], ids=["gqa+learned_gelu+dropout+neftune", "mla+swiglu", "tied+moe_bias+gelu"])
def test_smoke_trains_with_the_flags(flags, shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", *flags, f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4", "--micro_batches=1",
                    "--val_tokens=2048"])  # one micro-batch and two val sequences: half the time of the preset
    out = capsys.readouterr().out
    vals = val_losses(out)
    assert code == 0 and "architecture:" in out and "forward FLOPs/token" in out
    assert len(vals) == 3 and vals[-1] < vals[0] - 2.5, vals
    assert ("moe_load_min_max:" in out) == ("--moe_experts=4" in flags)
