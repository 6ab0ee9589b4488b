"""The residual stream's later form (issue 14; ../shared/docs/frontier_recipe.md sections 3.3-3.5): per-sub-layer
lambdas (--sublayer_lambdas, r45; by hand in tests/features/test_sublayer.py), attention reading an earlier block's
output (--attn_input_skips, r77) and the MUDD gates (--mudd_gate_block, --mudd_gate_attn_layers, r85) with what
they feed: per-token XSA alphas, head output scales, x0 and bigram weights, skip weights. Each against a hand
computation or a float64 reference that writes the recipe's formulas out, plus the inits, causality, decoding,
gradients and optimizer groups, the flag checks and the presets. Smoke-size models (4 blocks of 128 dims, 2 heads,
block 2 without attention, long windows in blocks 0 and 3), a 1,024-token vocabulary."""
import math

import pytest
import torch

import features.bigram as bigram_feature
import features.mudd as mudd_feature
import features.sublayer as sublayer_feature
import features.xsa as xsa_feature
import train_gpt as tg
from conftest import assert_traces_as_one_graph_in_bf16, cached_logits, frontier_args, live_model, smoke_args

V = "--vocab_size=1024"
SUBLAYER = ["--sublayer_lambdas=true", "--resid_lambda_init=1.1"]
GATED = [V, *SUBLAYER, "--mudd_gate_block=2", "--xsa_layers=1,3", "--mudd_gate_attn_layers=0,3",
         "--skip_pairs=0:2,1:3", "--attn_input_skips=0:1"]
BIGRAM = "--bigram_rows=512"
# the layout GATED + BIGRAM asks for, written out: the gate from x0 serves blocks 0 and 1 and the skip into block 2
# (added before block 2's gate runs), the gate from block 2's input serves blocks 2 and 3 and the skip into 3
PRE = [("xsa1", 2), ("attn0", 2), ("x0_0", 1), ("bigram0", 1), ("x0_1", 1), ("bigram1", 1), ("skip0", 1)]
POST = [("xsa3", 2), ("attn3", 2), ("x0_3", 1), ("bigram3", 1), ("skip1", 1)]


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def gated_model(*flags, seed: int = 0):
    """live_model (every zero parameter random) with the gates' W2 N(0, 0.3^2), so that gate values vary per
    token, and the bigram table N(0, 1)."""
    model = live_model(*flags, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mudd_feature.MuddGate):
                m.w2.normal_(0, 0.3)
            if isinstance(m, bigram_feature.BigramHashEmbedding):
                m.table.weight.normal_()
    return model


def reference_gate(gate: "mudd_feature.MuddGate", z: torch.Tensor, layout) -> dict:
    """s (W2 GELU(W1 z) + b) in float64 with GELU written out, cut into the named pieces of layout."""
    u = z.double() @ gate.w1.double().T
    g = gate.scale.double() * (0.5 * u * (1 + torch.erf(u / math.sqrt(2))) @ gate.w2.double().T + gate.b.double())
    pieces = g.float().split([w for _, w in layout], dim=-1)
    return {f"gate.{name}": p for (name, _), p in zip(layout, pieces)}


# ---------------------------------------------------------------------------------------------------------------
# The pieces, by hand


def test_gate_by_hand_and_its_inits():
    torch.manual_seed(0)
    gate = mudd_feature.MuddGate(3, [("a", 2, 0.25), ("b", 1, -1.0)])
    assert gate.b.tolist() == pytest.approx([2.5, 2.5, -10.0]) and gate.scale.item() == pytest.approx(0.1)
    z = torch.tensor([[[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]]])
    sources = {}
    assert gate(z, sources) is z  # it only writes its values
    torch.testing.assert_close(sources["a"], torch.tensor([[[0.25, 0.25], [0.25, 0.25]]]))  # W2 = 0: the inits
    torch.testing.assert_close(sources["b"], torch.tensor([[[-1.0], [-1.0]]]))
    with torch.no_grad():
        gate.w2.normal_()
        gate.scale.fill_(0.7)
    gate(z, sources)
    w1, w2, b = gate.w1.tolist(), gate.w2.tolist(), gate.b.tolist()
    gelu = lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2)))
    expected = [[0.7 * (sum(w2[k][j] * gelu(sum(w1[j][i] * zt[i] for i in range(3))) for j in range(64)) + b[k])
                 for k in range(3)] for zt in z[0].tolist()]
    torch.testing.assert_close(torch.cat([sources["a"], sources["b"]], -1)[0], torch.tensor(expected),
                               rtol=1e-5, atol=1e-6)


def test_gated_xsa_is_static_xsa_with_each_tokens_alpha():
    """GatedExclusiveSelfAttention at token t = ExclusiveSelfAttention with alpha = the gate's alpha(t); grouped
    query heads (4 query heads on 2 value heads) use their group's value."""
    torch.manual_seed(0)
    y, v, alpha = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 4) * 2
    gated = mudd_feature.GatedExclusiveSelfAttention(4, 2, "gate.xsa3")(y, v, {"gate.xsa3": alpha})
    static = xsa_feature.ExclusiveSelfAttention(4, 2)
    for t in range(5):
        with torch.no_grad():
            static.alpha.copy_(alpha[0, t])
        torch.testing.assert_close(gated[:, t], static(y, v)[:, t])
    for t, h in [(0, 0), (2, 3), (4, 1)]:  # the projection itself, by hand
        yh, vh = y[0, t, h], v[0, t, h // 2]
        expected = yh - math.tanh(alpha[0, t, h].item()) * (yh @ vh) / (vh @ vh) * vh
        torch.testing.assert_close(gated[0, t, h], expected)


def test_gated_head_scale_multiplies_each_head():
    y, g = torch.randn(1, 3, 2, 4), torch.tensor([[[0.25, -2.0], [1.0, 0.0], [3.0, 0.5]]])
    out = mudd_feature.GatedHeadScale("gate.attn0")(y, None, {"gate.attn0": g})
    torch.testing.assert_close(out, y * g[..., None])


# ---------------------------------------------------------------------------------------------------------------
# The gated model against a reference that writes the recipe's residual stream out


def test_gate_layout():
    before, after = mudd_feature.mudd_gate_outputs(smoke_args(*GATED, BIGRAM))
    inits = dict(xsa=0.0, attn=0.25, x0_=0.0, bigram=0.05, skip=0.5)
    expect = lambda layout: [(f"gate.{n}", w, next(v for k, v in inits.items() if n.startswith(k)))
                             for n, w in layout]
    assert before == expect(PRE) and after == expect(POST)
    without = mudd_feature.mudd_gate_outputs(smoke_args(*GATED))  # no bigram table: no bigram weights
    assert [k for k, _, _ in without[0] + without[1]] == [f"gate.{n}" for n, _ in PRE + POST if "bigram" not in n]
    assert mudd_feature.mudd_gate_outputs(smoke_args(V)) == ([], [])


def reference_hidden(model, x):
    """GPT.hidden of the GATED + BIGRAM model from the recipe's formulas (3.3): x = x0 + g_bg,0 b; per block the
    skips times sigmoid-free weight w times g_skip; the second gate on block 2's input; a = Attn(RMSNorm(u)) with
    u = c0 for block 1; x <- r_a x + p_a a + g_x0 x0 + g_bg b (blocks after 0); x <- r_m x + p_m MLP(RMSNorm(x))."""
    masks = model.attention_masks(x, model.default_window_blocks)
    ve = model.value_embeds[0](x)[None]
    x0 = tg.norm(model.embed(x)[None])
    bigram = model.bigram
    signs = bigram.signs[bigram_feature.bigram_sign_index(x)].float()
    b = (bigram.table(bigram_feature.bigram_hash(x, bigram.rows)) * signs)[None]
    g = reference_gate(model.pre_gate, x0, PRE)
    h = x0 + g["gate.bigram0"] * b
    outs = {}
    for i, block in enumerate(model.blocks):
        for w, src in model.skips_into[i]:
            h = h + model.skip_weights[w] * g[f"gate.skip{w}"] * outs[src]
        if i == 2:
            g |= reference_gate(block.entry_gate, h, POST)
        if block.attn is not None:
            u = outs[0] if i == 1 else h
            a = block.attn(tg.norm(u), ve if i in (0, 3) else None, masks[model.mask_key[i]], g)
            h = block.resid_lambdas[0] * h + block.post_lambdas[0] * a + g[f"gate.x0_{i}"] * x0
            h = h + (g[f"gate.bigram{i}"] * b if i > 0 else 0)
        h = block.resid_lambdas[-1] * h + block.post_lambdas[-1] * block.mlp(tg.norm(h))
        outs[i] = h
    return tg.norm(h)[0]


def test_gated_model_matches_the_reference():
    model = gated_model(*GATED, BIGRAM)
    assert [type(model.blocks[i].attn.xsa) for i in (1, 3)] == [mudd_feature.GatedExclusiveSelfAttention] * 2
    assert [type(model.blocks[i].attn.out_gate) for i in (0, 1, 3)] == [mudd_feature.GatedHeadScale, tg.PassThrough,
                                                                        mudd_feature.GatedHeadScale]
    assert isinstance(model.blocks[2].entry_gate, mudd_feature.MuddGate)
    assert type(model.blocks[3].entry_gate) is tg.PassThrough
    x = tokens(256)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(x), reference_hidden(model, x), rtol=1e-4, atol=1e-4)
        sources = {}
        model.pre_gate(torch.randn(1, 8, 128), sources)
        assert sources["gate.attn0"].std(dim=1).min() > 0.01  # the values vary per token


def test_gates_start_at_their_inits_for_every_token():
    torch.manual_seed(0)
    model = tg.build_model(smoke_args(*GATED, BIGRAM))
    sources = {}
    model.pre_gate(torch.randn(1, 64, 128) * 3, sources)
    model.blocks[2].entry_gate(torch.randn(1, 64, 128) * 3, sources)
    inits = {"xsa": 0.0, "attn": 0.25, "x0_": 0.0, "bigram": 0.05, "skip": 0.5}
    for key, value in sources.items():
        init = next(v for k, v in inits.items() if key.startswith(f"gate.{k}"))
        torch.testing.assert_close(value, torch.full_like(value, init), rtol=0, atol=1e-7)


def test_future_tokens_never_change_past_logits():
    model = gated_model(*GATED, BIGRAM)
    x = tokens(512)
    y = x.clone()
    y[400:] = tokens(112, seed=1)
    with torch.no_grad():
        before, after = model(x), model(y)
    torch.testing.assert_close(after[:400], before[:400], rtol=0, atol=0)
    assert not torch.allclose(after[400:], before[400:])


def test_kv_cache_decoding_matches_the_full_forward():
    """Every gate value is a function of its own token's x0 or residual, and the attention-input skip reads the
    same token's earlier output: decoding one token at a time gives the full forward's logits."""
    model = gated_model(*GATED).eval()
    x = tokens(256)
    with torch.no_grad():
        full = model.logits(model.hidden(x, 2))
        torch.testing.assert_close(cached_logits(model, x, 2), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Gradients, optimizers, training, compile


def test_every_new_parameter_learns_and_has_one_optimizer():
    flags = [*GATED, BIGRAM]
    model = gated_model(*flags)
    x = tokens(513)
    model(x[:-1], x[1:]).backward()
    gates = [model.pre_gate, model.blocks[2].entry_gate]
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.any(), name
    args = smoke_args(*flags, "--adam_wd=0.005", "--adam_group_betas=mudd_gate=0.9/0.99",
                      "--adam_group_wd=mudd_gate_bias=0")
    adam, muon = tg.build_optimizers(model, args)
    owned = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    groups = {g["name"]: g for g in adam.param_groups}
    ids = lambda params: sorted(map(id, params))
    assert ids(groups["mudd_gate"]["params"]) == ids(p for m in gates for p in (m.w1, m.w2))
    assert gates[0].scale is gates[1].scale  # the record's one scale for both gates
    assert ids(groups["mudd_gate_bias"]["params"]) == ids([gates[0].b, gates[1].b, gates[0].scale])
    assert groups["mudd_gate"]["lr"] == groups["mudd_gate_bias"]["lr"] == 8e-4 and "mudd" not in groups
    assert groups["mudd_gate"]["betas"] == (0.9, 0.99) and groups["mudd_gate"]["weight_decay"] == 0.005
    assert groups["mudd_gate_bias"]["weight_decay"] == 0
    assert ids(groups["resid_lambdas"]["params"]) == ids(b.resid_lambdas for b in model.blocks)
    assert ids(groups["post_lambdas"]["params"]) == ids(b.post_lambdas for b in model.blocks)


def test_a_gated_model_trains_a_few_steps_with_falling_loss():
    args = smoke_args(*GATED, BIGRAM, "--num_iterations=6")
    torch.manual_seed(0)
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    batch = torch.randint(0, 1024, (args.micro_batches, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    micro = [(t[:-1].int(), t[1:].long()) for t in batch]  # the same batch every step: the loss must fall
    losses = [tg.train_step(model, opts, micro, torch.tensor(tg.long_window_blocks(step, args), dtype=torch.int32),
                            args, step, 1).item() for step in range(6)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    assert model.pre_gate.w2.any() and model.blocks[2].entry_gate.w2.any()


def test_gated_model_traces_as_one_graph_in_bf16():
    model = gated_model(*GATED, BIGRAM)
    assert_traces_as_one_graph_in_bf16(model, tokens(256))


# ---------------------------------------------------------------------------------------------------------------
# Flags, the default, describe_model, the presets


@pytest.mark.parametrize("flags, message", [
    (["--mudd_gate_block=2"], "add --sublayer_lambdas"),
    (["--sublayer_lambdas=true", "--mudd_gate_block=0"], "must be in 1..3"),
    (["--sublayer_lambdas=true", "--mudd_gate_block=3", "--mudd_block=3", "--mudd_block_source=2"],
     "and not the --mudd_block"),
    (["--mudd_gate_attn_layers=3"], "it needs --mudd_gate_block"),
    (["--sublayer_lambdas=true", "--mudd_gate_block=1", "--mudd_gate_attn_layers=2"],
     "must name different blocks with attention"),
    (["--sublayer_lambdas=true", "--mudd_gate_block=1", "--mudd_gate_attn_layers=3,3"], "a block twice"),
    (["--attn_input_skips=1:0"], "each src:dst needs 0 <= src < dst"),
    (["--attn_input_skips=0:2"], "with attention in dst"),
    (["--attn_input_skips=0:3", "--mudd_block=3", "--mudd_block_source=1"], "names the --mudd_block=3 as a dst"),
    (["--attn_input_skips=0:3,1:3"], "two attention inputs"),
    (["--attn_input_skips=a"], "expected src:dst pairs"),
    (["--sublayer_lambdas=true", "--resid_lambda_init=-1"], "must be >= 0"),
    (["--mudd_gate_lr=-1"], "--mudd_gate_lr=-1.0 must be >= 0"),
])
def test_bad_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


def test_meaningless_gate_lr_warns():
    assert any("--mudd_gate_lr" in w for w in tg.meaningless_flags(smoke_args("--mudd_gate_lr=0.01")))


def test_default_model_has_none_of_it():
    model = tg.build_model(smoke_args(V))
    assert all(type(b) is tg.Block and type(b.attn_input) is tg.PassThrough for b in model.blocks)
    assert type(model.pre_gate) is tg.PassThrough and not isinstance(model.skip_scales, torch.nn.Module)
    assert not [m for m in model.modules() if isinstance(m, (mudd_feature.MuddGate, sublayer_feature.SublayerBlock))]
    assert not tg.param_groups(model).get("mudd_gate")


def test_describe_model_counts_the_gates():
    args = smoke_args(*GATED, BIGRAM)
    model = tg.build_model(args)
    pre, post = 64 * 128 + 9 * 64 + 9 + 1, 64 * 128 + 7 * 64 + 7 + 1  # W1, W2, b, s of 9 and of 7 values
    assert f"+ mudd {pre + post:,} =" in tg.describe_model(model, args)
    assert sum(map(tg.dense_flops_per_token, (model.pre_gate, model.blocks[2].entry_gate))) == \
        2 * (64 * 128 + 9 * 64) + 2 * (64 * 128 + 7 * 64)


def test_frontier_presets_carry_the_gated_residual_stream():
    args = frontier_args()
    assert (args.sublayer_lambdas, args.attn_input_skips, args.mudd_gate_block) == (True, "7:8,7:9", 4)
    assert (args.mudd_gate_attn_layers, args.xsa_layers, args.attn_gate) == ("3,10", "1,3,4,7", False)
    before, after = mudd_feature.mudd_gate_outputs(args)
    # the recipe's r85 gates: 26 values from x0; 41 from the residual entering layer 4 (12 of them DC's)
    assert sum(w for _, w, _ in before) == 26 and sum(w for _, w, _ in after) == 41
    assert [k for k, _, _ in before if "x0" in k] == [f"gate.x0_{i}" for i in range(4)]
    assert [k for k, _, _ in after if "x0" in k] == [f"gate.x0_{i}" for i in (4, 5, 7, 8, 9)]
    assert {k for k, _, _ in after} >= {"gate.xsa4", "gate.xsa7", "gate.attn10", "gate.skip0", "gate.dc_w1_10"}
    groups = dict(tg.parse_group_values(args.adam_group_betas, "b", tg.parse_betas))
    assert groups["mudd_gate"] == groups["mudd_gate_bias"] == (0.9, 0.99) and args.mudd_gate_lr == 8e-4
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke", V])
    tg.check_config(smoke, 1)
    model = tg.build_model(smoke)
    assert all(type(b) is sublayer_feature.SublayerBlock for b in model.blocks[:3])
    assert isinstance(model.blocks[3], mudd_feature.MuddBlock)
    assert isinstance(model.pre_gate, mudd_feature.MuddGate)
    assert isinstance(model.blocks[2].entry_gate, mudd_feature.MuddGate)
    assert [type(model.blocks[i].attn.out_gate) for i in (0, 1, 3)] == \
        [tg.PassThrough] * 2 + [mudd_feature.GatedHeadScale]
