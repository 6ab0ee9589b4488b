"""MUDD skip connections (issue 14; ../shared/docs/frontier_recipe.md sections 3.3 and 3.5, r81): the per-token
mixing weights F(z) = 0.1 (W2 GELU(W1 z) + b), the j=1 mix before the final norm (--mudd_final_sources) and the
j=0 block (--mudd_block, --mudd_block_source). Each against a hand computation or an independent float64
reference, the inits, causality, gradients and optimizer ownership, the flag checks, a few training steps, the
presets. Smoke-size models (4 blocks of 128 dims, blocks 0 and 3 read value-embedding table 0, block 2 has no
attention), a 1,024-token vocabulary where the head's size does not matter."""
import math

import pytest
import torch

import features.bigram as bigram_feature
import features.mudd as mudd_feature
import features.ve_gate as ve_gate_feature
import train_gpt as tg
from conftest import assert_traces_as_one_graph_in_bf16, cached_logits, randomize_zero_matrices, smoke_args

V = "--vocab_size=1024"
FINAL = "--mudd_final_sources=in,2:-0.5,1,ve0"  # c0, c2 (init -0.5), c1, VE_0
BLOCK = ["--mudd_block=3", "--mudd_block_source=2"]  # the last block, reading block 2's output
BIGRAM = "--bigram_rows=512"
ALL = [V, FINAL, *BLOCK, BIGRAM]


def live_model(*flags, seed: int = 0, w2_std: float = 0.3):
    """Smoke model with flags, zero matrices N(0, 0.02) (conftest), the MUDD W2s N(0, w2_std^2) so that the
    per-token weights vary from token to token, the bigram table N(0, 1)."""
    torch.manual_seed(seed)
    model = randomize_zero_matrices(tg.build_model(smoke_args(*flags)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mudd_feature.MuddWeights):
                m.w2.normal_(0, w2_std)
            if isinstance(m, bigram_feature.BigramHashEmbedding):
                m.table.weight.normal_()
    return model


def tokens(n: int, seed: int = 0, vocab: int = 1024) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def reference_weights(mudd: "mudd_feature.MuddWeights", z: torch.Tensor) -> torch.Tensor:
    """F(z) in float64 with GELU written out: 0.1 (W2 (u Phi(u)) + b), u = W1 z."""
    u = z.double() @ mudd.w1.double().T
    h = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    return (0.1 * (h @ mudd.w2.double().T + mudd.b.double())).float()


# ---------------------------------------------------------------------------------------------------------------
# The weights F(z), by hand


def test_mudd_weights_by_hand():
    """Two tokens of a 3-dim residual, two outputs: F computed with Python floats, loop by loop."""
    torch.manual_seed(0)
    mudd = mudd_feature.MuddWeights(3, [0.25, -1.0])
    with torch.no_grad():
        mudd.w2.normal_()
    z = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]])
    w1, w2, b = mudd.w1.tolist(), mudd.w2.tolist(), mudd.b.tolist()
    assert b == pytest.approx([2.5, -10.0])  # b = init / 0.1
    gelu = lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2)))
    expected = [[0.1 * (sum(w2[k][j] * gelu(sum(w1[j][i] * zt[i] for i in range(3))) for j in range(64)) + b[k])
                 for k in range(2)] for zt in z.tolist()]
    torch.testing.assert_close(mudd(z), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert mudd(z.bfloat16()).dtype == torch.bfloat16  # fp32 inside, the residual's dtype out


def test_mudd_weights_start_at_the_effective_inits_for_every_token():
    torch.manual_seed(0)
    z = torch.randn(1, 256, 128) * 3
    final = mudd_feature.MuddFinalMix(128, mudd_feature.parse_mudd_sources("in,7:-0.5,9,ve0,3"))
    assert torch.equal(final.mudd(z), torch.tensor([0.0, -0.5, 0.0, 0.0, 0.0]).expand(1, 256, 5))  # exact
    block = live_model(*ALL).blocks[3]
    assert isinstance(block, mudd_feature.MuddBlock)
    torch.nn.init.zeros_(block.mudd.w2)
    inits = [0, 0, 0, 0, 0, 0, 2, 2, 1.1 ** 0.5, 1, 0, 0.05, 1.1 ** 0.5, 1]
    torch.testing.assert_close(block.mudd(z), torch.tensor(inits).expand(1, 256, 14), rtol=0, atol=1e-6)
    w1, bound = block.mudd.w1, 128 ** -0.5  # U(+-1/sqrt(dim)): its std is bound / sqrt(3)
    assert w1.shape == (64, 128) and w1.abs().max() <= bound and w1.std().item() == pytest.approx(
        bound / 3 ** 0.5, rel=0.05)


def test_parse_mudd_sources():
    assert mudd_feature.parse_mudd_sources("in,7:-0.5,9,ve0,3") == \
        [("in", 0.0), (7, -0.5), (9, 0.0), ("ve0", 0.0), (3, 0.0)]
    assert mudd_feature.parse_mudd_sources(" 2:1e-2 , ve1 ") == [(2, 0.01), ("ve1", 0.0)]
    assert mudd_feature.parse_mudd_sources("") == []
    with pytest.raises(ValueError):
        mudd_feature.parse_mudd_sources("c7")


# ---------------------------------------------------------------------------------------------------------------
# The mixes inside the model, against a reference that runs the blocks one by one


def reference_hidden(model, x):
    """GPT.hidden with the j=0 block and the j=1 mix written out from the recipe's formulas (float64 weights)."""
    masks = model.attention_masks(x, model.default_window_blocks)
    ves = [ve(x)[None] for ve in model.value_embeds]
    x0 = tg.norm(model.embed(x)[None])
    bigram = model.bigram
    signs = bigram.signs[bigram_feature.bigram_sign_index(x)].float()
    b = (bigram.table(bigram_feature.bigram_hash(x, bigram.rows)) * signs)[None]
    h = c0 = x0 + bigram.inject.lam * b
    outs = {}
    for i, block in enumerate(model.blocks):
        for w, src in model.skips_into[i]:
            h = h + model.skip_weights[w] * outs[src]
        ve, mask = ves[model.ve_table[i]] if model.ve_table[i] is not None else None, masks[model.mask_key[i]]
        if i != 3:
            h = block(h, x0, ve, mask)
        else:  # the recipe's layer 10 with c = block 2's output
            m = reference_weights(block.mudd, h)
            mk = lambda k: m[..., k:k + 1]
            c, heads, hd = outs[2], block.attn.num_heads, block.attn.head_dim
            values = mk(0) * c0 + mk(1) * c + mk(2) * h
            gated = torch.cat([ve[..., j * hd:(j + 1) * hd] * (mk(6) if j < (heads + 1) // 2 else mk(7))
                               for j in range(heads)], dim=-1)
            h = (1 + mk(5)) * h + mk(3) * c0 + mk(4) * c
            h = mk(8) * h + mk(9) * block.attn(tg.norm(c), gated + values, mask) + mk(10) * c0 + mk(11) * b
            h = mk(12) * h + mk(13) * block.mlp(tg.norm(h))
        outs[i] = h
    m = reference_weights(model.mudd_final.mudd, h)
    h = h + m[..., 0:1] * c0 + m[..., 1:2] * outs[2] + m[..., 2:3] * outs[1] + m[..., 3:4] * ves[0]
    return tg.norm(h)[0]


def test_both_mixes_match_the_reference():
    model = live_model(*ALL)
    x = tokens(256)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(x), reference_hidden(model, x), rtol=1e-4, atol=1e-4)
        assert model.blocks[3].mudd(torch.randn(1, 8, 128)).std(dim=1).min() > 0.01  # weights vary per token


def test_final_mix_at_init_is_the_backout_bit_for_bit():
    """Built last, the j=1 mix leaves every other parameter the same draw; at init it adds -0.5 c2 and zeros."""
    torch.manual_seed(0)
    backout = randomize_zero_matrices(tg.build_model(smoke_args(V, "--backout_layer=2")))
    torch.manual_seed(0)
    mudd = tg.build_model(smoke_args(V, FINAL))
    plain = {k: v for k, v in mudd.state_dict().items() if not k.startswith("mudd_final.")}
    torch.manual_seed(0)
    fresh = tg.build_model(smoke_args(V, "--backout_layer=2")).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in plain.items())
    missing, unexpected = mudd.load_state_dict(backout.state_dict(), strict=False)
    assert unexpected == ["backout.lam"] and sorted(missing) == ["mudd_final.mudd.b", "mudd_final.mudd.w1",
                                                                 "mudd_final.mudd.w2"]
    x = tokens(256)
    with torch.no_grad():
        assert torch.equal(mudd(x), backout(x))


def test_future_tokens_never_change_past_logits():
    model = live_model(*ALL)
    x = tokens(512)
    y = x.clone()
    y[400:] = tokens(112, seed=1)
    with torch.no_grad():
        before, after = model(x), model(y)
    torch.testing.assert_close(after[:400], before[:400], rtol=0, atol=0)
    assert not torch.allclose(after[400:], before[400:])


def test_mudd_block_without_value_embedding_or_bigram():
    """Block 1 (no value embedding) without a bigram table: m6, m7 and m11 idle, the value terms still enter V;
    decoding with a KV cache matches the full forward (every mix is per token)."""
    model = live_model(V, "--mudd_block=1", "--mudd_block_source=0", FINAL).eval()
    block = model.blocks[1]
    assert type(block.ve_gate) is tg.PassThrough and type(block.add_bigram) is tg.PassThrough
    x = tokens(256)
    with torch.no_grad():
        full = model.logits(model.hidden(x, 2))
        torch.testing.assert_close(cached_logits(model, x, 2), full, rtol=1e-4, atol=1e-4)
        block.mudd.b[:3] = 0.0  # with the value terms' W2 rows zeroed too, they vanish
        block.mudd.w2[:3] = 0.0
        without = model(x)
        block.mudd.b[2] = 3.0
        assert not torch.allclose(model(x), without)


# ---------------------------------------------------------------------------------------------------------------
# Gradients, optimizers, training


def test_every_new_parameter_learns_and_has_one_optimizer():
    args = smoke_args(*ALL)
    model = live_model(*ALL)
    x = tokens(513)
    model(x[:-1], x[1:]).backward()
    mudds = [m for m in model.modules() if isinstance(m, mudd_feature.MuddWeights)]
    assert len(mudds) == 2
    for p in (p for m in mudds for p in m.parameters()):
        assert p.grad is not None and p.grad.any()
    assert all(p.grad is not None for p in model.parameters())  # the block's lambdas are gone, nothing idles
    adam, muon = tg.build_optimizers(model, args)
    owned = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    groups = {g["name"]: g for g in adam.param_groups}
    assert [id(p) for p in groups["mudd"]["params"]] == [id(p) for m in mudds for p in (m.w1, m.w2)]
    assert [id(p) for p in groups["mudd_bias"]["params"]] == [id(m.b) for m in mudds]
    assert groups["mudd"]["lr"] == groups["mudd_bias"]["lr"] == 0.002
    wd = smoke_args(*ALL, "--adam_wd=0.005", "--adam_group_betas=mudd=0.9/0.99", "--adam_group_wd=mudd_bias=0")
    named = {g["name"]: g for g in tg.build_optimizers(model, wd)[0].param_groups}
    assert named["mudd"]["betas"] == (0.9, 0.99) and named["mudd"]["weight_decay"] == 0.005
    assert named["mudd_bias"]["weight_decay"] == 0


def test_truncated_init_leaves_the_mudd_draw_alone():
    torch.manual_seed(0)
    uniform = tg.build_model(smoke_args(*ALL))
    torch.manual_seed(0)
    truncated = tg.build_model(smoke_args(*ALL, "--weight_init=truncated"))
    assert torch.equal(uniform.mudd_final.mudd.w1, truncated.mudd_final.mudd.w1)
    assert not torch.equal(uniform.blocks[0].mlp.c_fc.weight, truncated.blocks[0].mlp.c_fc.weight)


def test_a_mudd_model_trains_a_few_steps_with_falling_loss():
    args = smoke_args(*ALL, "--num_iterations=6")
    torch.manual_seed(0)
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    batch = torch.randint(0, 1024, (args.micro_batches, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    micro = [(t[:-1].int(), t[1:].long()) for t in batch]  # the same batch every step: the loss must fall
    losses = [tg.train_step(model, opts, micro, torch.tensor(tg.long_window_blocks(step, args), dtype=torch.int32),
                            args, step, 1).item() for step in range(6)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    assert model.mudd_final.mudd.w2.any() and model.blocks[3].mudd.w2.any()  # W2 left zero after the first step


def test_mudd_model_traces_as_one_graph_in_bf16():
    model = live_model(*ALL)
    assert_traces_as_one_graph_in_bf16(model, tokens(256))


# ---------------------------------------------------------------------------------------------------------------
# Flags, the default, describe_model, the presets


@pytest.mark.parametrize("flags, message", [
    (["--mudd_final_sources=in,c7"], "expected comma-separated sources, each 'in'"),
    (["--mudd_final_sources=,"], "lists no source"),
    (["--mudd_final_sources=in,9"], "blocks must be in 0..3"),
    (["--mudd_final_sources=ve1"], "value-embedding tables in 0..0"),
    (["--mudd_final_sources=in,2,2:-0.5"], "lists a source twice"),
    (["--mudd_final_sources=in:nan"], "the inits must be finite"),
    (["--mudd_final_sources=2:-0.5", "--backout_layer=2"], "list '2:-0.5' among its sources and drop --backout"),
    (["--mudd_final_sources=ve0", "--n_kv_heads=1"], "drop the veK sources"),
    (["--mudd_block=4"], "--mudd_block=4 must be a block in 0..3"),
    (["--mudd_block=3"], "needs --mudd_block_source in 0..2"),
    (["--mudd_block=1", "--mudd_block_source=1"], "needs --mudd_block_source in 0..0"),
    (["--mudd_block=2", "--mudd_block_source=1"], "block 2 has none \\(--no_attn_layers\\)"),
    (["--mudd_block=3", "--mudd_block_source=2", "--n_kv_heads=1"], "it needs multi-head attention"),
])
def test_bad_mudd_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


def test_meaningless_mudd_flags_warn():
    warnings = tg.meaningless_flags(smoke_args("--mudd_block_source=2", "--mudd_lr=0.01"))
    assert any("--mudd_block_source" in w for w in warnings) and any("--mudd_lr" in w for w in warnings)


def test_default_model_has_no_mudd():
    model = tg.build_model(smoke_args(V))
    kinds = (mudd_feature.MuddWeights, mudd_feature.MuddFinalMix, mudd_feature.MuddBlock)
    assert not [m for m in model.modules() if isinstance(m, kinds)]
    assert type(model.mudd_final) is tg.PassThrough and all(type(b) is tg.Block for b in model.blocks)
    assert not tg.param_groups(model).get("mudd") and "mudd" not in tg.describe_model(model, smoke_args(V))


def test_describe_model_counts_the_mixes():
    args = smoke_args(*ALL)
    model = tg.build_model(args)
    final, block = 64 * 128 + 4 * 64 + 4, 64 * 128 + 14 * 64 + 14  # W1, W2, b of 4 and of 14 outputs
    text = tg.describe_model(model, args)
    assert f"+ mudd {final + block:,} =" in text, text
    assert sum(map(tg.dense_flops_per_token, (model.mudd_final.mudd, model.blocks[3].mudd))) == \
        2 * (64 * 128 + 4 * 64) + 2 * (64 * 128 + 14 * 64)
    assert "+ mudd 0.04M =" in text  # 35,072 FLOPs/token
    lambdas_and_gate = tg.count_params(tg.build_model(smoke_args(V, BIGRAM))) - tg.count_params(model)
    assert lambdas_and_gate == -(final + block) + 2  # block 3's two lambdas are gone


def test_frontier_presets_carry_mudd():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"])
    tg.check_config(args, 8)
    assert (args.mudd_final_sources, args.mudd_block, args.mudd_block_source) == ("in,7:-0.5,9,ve0,3", 10, 7)
    assert args.backout_layer == -1 and args.mudd_lr == 0.002
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke", V])
    tg.check_config(smoke, 1)
    model = tg.build_model(smoke)
    assert isinstance(model.blocks[3], mudd_feature.MuddBlock) and model.blocks[3].source == 2
    assert isinstance(model.blocks[3].ve_gate, mudd_feature.MuddHeadGates) and isinstance(model.blocks[3].add_bigram,
                                                                                 mudd_feature.ScaledAdd)
    assert type(model.blocks[3].attn.ve_gate) is tg.PassThrough  # m6, m7 replace ValueEmbedGate there
    assert isinstance(model.blocks[1].attn.ve_gate, ve_gate_feature.ValueEmbedGate)
    assert model.mudd_final.sources == [(False, "in"), (False, 2), (False, 1), (True, 0)]
    adam = {g["name"]: g for g in tg.build_optimizers(model, smoke)[0].param_groups}
    assert adam["mudd"]["betas"] == adam["mudd_bias"]["betas"] == (0.9, 0.99)
    assert adam["mudd"]["weight_decay"] == 0.005 and adam["mudd_bias"]["weight_decay"] == 0
