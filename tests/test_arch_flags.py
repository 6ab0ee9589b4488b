"""Architecture-ablation flags (issue 6): GQA, MLA, MoE, mlp_act, NEFTune, dropout, tied embeddings. Per flag: shapes,
causality, parameter-count formula, config errors; GQA vs baseline attention, the MLA cache size, MoE routing against
a slow reference loop and its balancing; train-only noise; and short smoke runs with the flags combined."""
import math

import pytest
import torch
import torch.nn.functional as F

import features.learned_gelu as learned_gelu_feature
import features.mla as mla_feature
import features.moe as moe_feature
import train_gpt as tg
from conftest import smoke_args, smoke_model, val_losses

V, VP, D, H, HD, L, HIDDEN = 50257, 50304, 128, 2, 64, 4, 512  # the smoke preset; block 2 has no attention
ATTN_LAYERS, NVE = 3, 1
BASELINE = 20_025_616  # smoke-preset parameter count

MLA = ["--mla_kv_rank=32", "--mla_q_rank=48", "--mla_rope_dim=16"]
MOE = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1"]
MOE_SWIGLU = [*MOE, "--mlp_act=swiglu"]


def tokens(T=256, seed=0, eot=(0, 100)):
    x = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(seed))
    x[list(eot)] = tg.EOT_TOKEN
    return x


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
    x = tokens()
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
    mask = tg.dense_attention_mask(tokens(), 2)
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
    mask = tg.dense_attention_mask(tokens(), 2)
    ve_per_head = ve.view(1, 256, kv, hd).repeat_interleave(heads // kv, dim=2).flatten(2)
    torch.testing.assert_close(gqa(x, ve, mask), base(x, ve_per_head, mask), rtol=1e-5, atol=1e-6)
    assert gqa.kv_cache_floats_per_token() == 2 * kv * hd


# --- MLA ----------------------------------------------------------------------------------------------------------

def test_mla_cache_holds_the_latent_and_the_shared_rotary_key():
    model = smoke_model(*MLA)
    attn = model.blocks[0].attn
    assert isinstance(attn, mla_feature.LatentAttention) and isinstance(attn.q_proj, mla_feature.LowRankLinear)
    assert attn.kv_cache_floats_per_token() == 32 + 16
    cached = {}
    attn.kv_down.register_forward_hook(lambda m, i, o: cached.__setitem__("latent", o.shape))
    attn.k_rope.register_forward_hook(lambda m, i, o: cached.__setitem__("rope", o.shape))
    with torch.no_grad():
        model(tokens())
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


# --- MoE ----------------------------------------------------------------------------------------------------------

def small_moe(*extra, seed=0):
    torch.manual_seed(seed)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--model_dim=32", "--moe_experts=4",
                                                     "--moe_topk=2", "--moe_shared=1", "--moe_hidden=16", *extra])
    tg.check_config(args, 1)
    moe = moe_feature.MoE(args)
    with torch.no_grad():
        moe.proj_w.normal_(0, 0.2)
        moe.router.weight.normal_(0, 0.5)
    return moe


def relu2_expert(moe, e, x):
    return moe.proj_w[e] @ F.relu(moe.fc_w[e] @ x).square()


def swiglu_expert(moe, e, x):
    gate, up = (moe.fc_w[e] @ x).chunk(2)  # fc_w rows: [gate | up]
    return moe.proj_w[e] @ (F.silu(gate) * up)


def reference_moe(moe, x, expert=relu2_expert):
    """Token by token, expert by expert."""
    probs = F.softmax(x @ moe.router.weight.T, -1)
    out = torch.zeros_like(x)
    for n in range(len(x)):
        top = torch.topk(probs[n] + moe.bias, moe.topk).indices.tolist()
        for e, g in [(e, probs[n, e]) for e in top] + [(moe.num_experts + s, 1.0) for s in range(moe.num_shared)]:
            out[n] += g * expert(moe, e, x[n])
    return out


def test_moe_routes_each_token_to_exactly_topk_experts_plus_the_shared():
    moe = small_moe()
    x = torch.randn(64, 32)
    experts, gates, probs = moe.route(x)
    assert experts.shape == gates.shape == (64, 3)
    top = experts[:, :2]
    assert (top < 4).all() and (top[:, 0] != top[:, 1]).all() and (experts[:, 2] == 4).all()
    assert torch.equal(top.sort(-1).values, torch.topk(probs, 2).indices.sort(-1).values)
    torch.testing.assert_close(gates[:, :2], probs.gather(-1, top))
    assert (gates[:, 2] == 1).all()
    moe.eval()
    moe(x)
    assert moe.eval_load.sum() == 64 * 2 and moe.load.sum() == 0  # routed pairs add up to tokens * topk
    moe.train()
    moe(x)
    assert torch.equal(moe.load, moe.eval_load)


@pytest.mark.parametrize("act,expert", [("relu2", relu2_expert), ("swiglu", swiglu_expert)], ids=["relu2", "swiglu"])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_equals_the_slow_reference_loop(skew, act, expert):
    moe = small_moe(f"--mlp_act={act}")
    assert moe.fc_w.shape == (5, 16 * (2 if act == "swiglu" else 1), 32)
    if skew:  # every token prefers expert 3: dropless means nothing is lost however unbalanced
        with torch.no_grad():
            moe.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.randn(2, 24, 32)
    y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.view(48, 32), reference_moe(moe, x.view(48, 32), expert), rtol=1e-5, atol=1e-5)
    if skew:
        assert moe.load[3] == 48
    w = torch.randn_like(y)
    (y * w).sum().backward()  # gradients through the grouped matmuls equal the loop's
    grads = [p.grad.clone() for p in (moe.fc_w, moe.proj_w, moe.router.weight)]
    moe.zero_grad()
    (reference_moe(moe, x.view(48, 32), expert) * w.view(48, 32)).sum().backward()
    for g, p in zip(grads, (moe.fc_w, moe.proj_w, moe.router.weight)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_moe_aux_loss_is_its_minimum_at_uniform_routing():
    moe = small_moe("--moe_aux_coef=0.01")
    x = torch.randn(64, 32)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probs: the loss is coef * E * sum_e f_e / E = coef for any loads
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01))
    probs = torch.full((64, 4), 0.25)
    moe.observe(torch.full((4,), 32.0), probs)  # uniform loads and probs
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01))
    skewed = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(64, 4)
    moe.observe(torch.tensor([64.0, 32.0, 16.0, 16.0]), skewed)  # loads follow the skewed probs
    assert moe.aux_loss > 0.01 * 1.5
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    moe(x)
    assert moe.aux_loss > 0.01
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0  # the aux loss trains the router
    assert small_moe("--moe_balance=bias").aux_coef == 0.0


def test_moe_aux_loss_is_added_in_training_only():
    model = smoke_model(*MOE)
    x = tokens()
    loss = model(x[:-128], x[1:-127])
    ce = F.cross_entropy(model(x[:-128]), x[1:-127])  # this forward leaves the aux losses in place
    aux = sum(m.aux_loss for m in moe_feature.moe_layers(model))
    assert 0.03 < aux.item() < 0.06  # 4 layers, about coef each near uniform routing
    torch.testing.assert_close(loss, ce + aux)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:-128], x[1:-127]), ce.detach(), rtol=1e-5, atol=1e-5)


def test_moe_bias_moves_toward_under_used_experts():
    moe = small_moe("--moe_balance=bias", "--moe_bias_rate=0.1")
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(moe.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # repeated updates from the observed loads spread a router that favors expert 0 over the experts
    moe = small_moe("--moe_balance=bias", "--moe_bias_rate=0.02")
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1
    loads = []
    for _ in range(40):
        moe.load.zero_()
        moe(x)
        loads.append(moe.load.clone())
        moe.update_bias(moe.load)
    spread = lambda load: (load.max() - load.min()).item()
    late = torch.stack(loads[-10:]).mean(0)  # constant-size sign steps end in an oscillation around balance
    assert spread(late) < 0.3 * spread(loads[0]), (loads[0], late)
    assert moe.bias[0] < 0 < moe.bias[1:].min()


def test_moe_bias_updates_once_per_optimizer_step_from_the_loads():
    for balance, moves in (("bias", True), ("aux", False)):
        args = smoke_args(*MOE, f"--moe_balance={balance}", "--moe_bias_rate=0.01")
        torch.manual_seed(0)
        model = tg.build_model(args)
        optimizers = tg.build_optimizers(model, args)
        x = tokens()
        for _ in range(2):  # two micro-batches accumulate into one step's load
            model(x[:-128], x[1:-127]).backward()
        loads = [m.load.clone() for m in moe_feature.moe_layers(model)]
        assert all(load.sum() == 2 * 128 * 2 for load in loads)
        for opt in optimizers:
            opt.step()
        for moe, load in zip(moe_feature.moe_layers(model), loads):
            expected = 0.01 * torch.sign(load.mean() - load) if moves else torch.zeros(4)
            torch.testing.assert_close(moe.bias, expected)
            assert moe.load.sum() == 0


def test_moe_weights_are_3d_muon_batches_and_utilization_is_logged():
    model = smoke_model(*MOE)
    args = smoke_args(*MOE)
    adam, muon = tg.build_optimizers(model, args)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    moe = moe_feature.moe_layers(model)[0]
    assert moe.fc_w.shape == (5, 192, D) and moe.proj_w.shape == (5, D, 192)
    assert {id(moe.fc_w), id(moe.proj_w), id(moe.router.weight)} <= muon_ids
    assert moe_feature.moe_utilization(tg.build_model(smoke_args())) == ""
    model.eval()
    with torch.no_grad():
        model(tokens())
    text = moe_feature.moe_utilization(model)
    assert text.startswith(" moe_load_min_max:") and len(text.split(":")[1].split(",")) == L
    assert all(m.eval_load.sum() == 0 for m in moe_feature.moe_layers(model))  # reset for the next validation
    assert moe.flops_per_token() == 2 * 4 * D + 2 * 3 * 2 * 192 * D


def test_swiglu_experts_take_two_thirds_of_the_width():
    """Default width: 2/3 of the relu2 experts' (rounded to 64), c_fc twice as wide, so parameters and active FLOPs
    stay near the dense MLP's; FLOPs count fc and proj separately."""
    args = tg.apply_overrides(tg.Hyperparameters(), [*MOE_SWIGLU, "--moe_experts=8"])
    tg.check_config(args, 1)
    assert moe_feature.moe_expert_hidden(args) == 704  # 2/3 * 3072 / 3 = 682.7 -> 704 (relu2 experts: 1024)
    moe = small_moe("--mlp_act=swiglu")
    assert isinstance(moe.act, tg.GatedSiLU) and moe.proj_w.shape == (5, 32, 16)
    assert moe.flops_per_token() == 2 * 4 * 32 + 2 * 3 * (32 * 32 + 32 * 16)
    x = torch.randn(10, 32)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(tg.GatedSiLU()(x), F.silu(gate) * up)


# --- weight_init ----------------------------------------------------------------------------------------------------

WEIGHT_INIT_CONFIGS = [[], ["--n_kv_heads=1"], MLA, MOE_SWIGLU, ["--mlp_act=swiglu"], ["--tie_embeddings=true"]]


@pytest.mark.parametrize("flags", WEIGHT_INIT_CONFIGS, ids=lambda f: "+".join(x[2:] for x in f[:1] + f[3:]) or "none")
def test_recipe_matrices_are_the_uniform_draws(flags):
    """The matrices --weight_init=truncated redraws are exactly those drawn from the recipe's uniform(+-sqrt(3) * 0.5
    / sqrt(fan_in)), fan_in = the last dim, in every architecture; everything else of >= 2 dims (embeddings,
    zero-initialized projections) is left alone."""
    model = tg.build_model(smoke_args(*flags))
    chosen = {id(p) for p in tg.recipe_matrices(model)}
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
    redrawn = {id(p) for p in tg.recipe_matrices(model)}
    assert len(redrawn) == 2 * ATTN_LAYERS + L  # GQA's q and kv, SwiGLU's merged fc (projections start at zero)
    for (name, p), u in zip(model.named_parameters(), uniform.parameters()):
        if id(p) not in redrawn:
            assert torch.equal(p, u), name  # the same draw: only the recipe matrices are redrawn
            continue
        s = 0.5 * p.size(-1) ** -0.5  # the uniform's std, kept
        sigma = s / tg.TRUNC2_STD  # the underlying normal, cut at 2 sigma = 2.27 s
        assert abs(p.std().item() / s - 1) < 0.02, name
        assert 0.97 * 2 * sigma < p.abs().max() <= 2 * sigma, name
        tail = (p.abs() > 3 ** 0.5 * s).float().mean().item()  # beyond the uniform's bound: 8.6% expected
        assert 0.07 < tail < 0.10, (name, tail)
    assert abs(tg.TRUNC2_STD - 0.8796) < 1e-4  # std of N(0, 1) cut to [-2, 2]
    z = torch.nn.init.trunc_normal_(torch.empty(10 ** 6), a=-2, b=2, generator=torch.Generator().manual_seed(0))
    assert abs(z.std().item() - tg.TRUNC2_STD) < 2e-3


# --- mlp_act, NEFTune, dropout, tied embeddings -------------------------------------------------------------------

def test_swiglu_matches_dense_parameters_at_768_and_learned_gelu_starts_as_gelu():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--mlp_act=swiglu"])
    swiglu, dense = tg.SwiGLUMLP(args), tg.MLP(tg.Hyperparameters())
    assert tg.swiglu_hidden(args) == 2048 and tg.count_params(swiglu) == tg.count_params(dense) == 2 * 768 * 3072
    act = learned_gelu_feature.LearnedGELU(16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(act(x), F.gelu(x))
    mlp = tg.build_mlp(smoke_args("--mlp_act=learned_gelu"))
    groups = tg.param_groups(smoke_model("--mlp_act=learned_gelu"))
    assert mlp.act.scale.shape == (HIDDEN,) and sum(p.shape == (HIDDEN,) for p in groups["scalars"]) == 2 * L


@pytest.mark.parametrize("flag", ["--neftune_alpha=5", "--dropout=0.1"])
def test_noise_is_train_only(flag):
    model = smoke_model(flag)
    reference = smoke_model()  # same seed, same weights, flag off
    x = tokens()
    model.eval()
    reference.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    model.train()
    a, b = model(x[:-128], x[1:-127]), model(x[:-128], x[1:-127])
    assert a.item() != b.item()


def test_neftune_noise_bound():
    noise = tg.NEFTune(5.0)
    x = torch.zeros(1, 256, 64)
    out = noise(x)
    bound = 5.0 / math.sqrt(256 * 64)
    assert out.abs().max() <= bound and out.abs().max() > 0.9 * bound and out.std() > 0.5 * bound
    assert torch.equal(noise.eval()(x), x)


def test_tied_head_shares_the_embedding_owned_by_adam_embeds():
    args = smoke_args("--tie_embeddings=true")
    model = smoke_model("--tie_embeddings=true")
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.shape == (VP, D)
    groups = tg.param_groups(model, args)
    assert groups["head"] == [] and sum(p is model.embed.weight for g in groups.values() for p in g) == 1
    adam, muon = tg.build_optimizers(model, args)
    owner = [g for g in adam.param_groups if any(p is model.embed.weight for p in g["params"])]
    assert len(owner) == 1 and owner[0]["lr"] == args.embed_lr
    x = tokens()
    with torch.no_grad():
        raw = model.lm_head(F.rms_norm(torch.randn(256, D), (D,)))
    assert 0.8 < raw.std() < 1.2  # x @ E^T / sqrt(dim) with E ~ N(0, 1): unit-std initial logits
    model(x[:-128], x[1:-127]).backward()
    rows = model.embed.weight.grad.abs().sum(-1)
    assert (rows[50257:] > 0).all()  # padding rows: head gradient only
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr()


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
