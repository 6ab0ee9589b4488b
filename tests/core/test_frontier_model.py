"""Frontier II (issue 14), the model half of the post-#21 recipe (../shared/docs/frontier_recipe.md sections 3.2-3.4)
as a whole: x-lambda init and sigmoid skip weights (core), and with them the features smear, sparse attention gate,
partial key offset, value-embedding gates, XSA and the bigram hash embedding: causality of each on a smoke model whose
zero-initialized weights are made live, every new parameter learning in one optimizer, one compiled graph, the
presets' layout, and the default left alone. Each feature against a hand computation: tests/features/test_<name>.py."""
import math

import pytest
import torch

import features.attn_gate as attn_gate_feature
import features.bigram as bigram_feature
import features.key_offset as key_offset_feature
import features.mudd as mudd_feature
import features.smear as smear_feature
import features.ve_gate as ve_gate_feature
import features.xsa as xsa_feature
import features.skip_gate as skip_gate_feature
import train_gpt as tg
from conftest import (assert_future_never_changes_past, assert_traces_as_one_graph_in_bf16, cached_logits, live_model,
                      randomize_zero_matrices, smoke_args, tokens_with_docs)

ALL = ["--smear=true", "--attn_gate=true", "--key_offset=true", "--resid_lambda_init=1.1", "--skip_gate=true",
       "--ve_gate=true", "--xsa_layers=1,3", "--bigram_rows=4096"]
FLAG_SETS = [[flag] for flag in ALL] + [ALL, ALL + ["--n_kv_heads=1"], ["--rope=canonical"]]


# ---------------------------------------------------------------------------------------------------------------
# The default is untouched


def test_default_model_has_no_frontier_modules():
    args = smoke_args()
    torch.manual_seed(0)
    model = tg.build_model(args)
    frontier = (smear_feature.Smear, bigram_feature.BigramHashEmbedding, skip_gate_feature.SigmoidSkipWeights,
                key_offset_feature.KeyOffset, ve_gate_feature.ValueEmbedGate, xsa_feature.ExclusiveSelfAttention,
                attn_gate_feature.AttentionGate)
    assert not [m for m in model.modules() if isinstance(m, frontier)]
    hooks = [getattr(b.attn, name) for b in model.blocks if b.attn is not None
             for name in ("key_offset", "ve_gate", "xsa", "out_gate")]
    assert hooks and all(type(h) is tg.PassThrough for h in hooks)
    assert all(not list(h.parameters()) and not list(h.buffers()) for h in hooks)
    assert torch.equal(model.skip_weights, torch.ones(2)) and all(b.lambdas.tolist() == [1.0, 0.0]
                                                                  for b in model.blocks)
    assert model.looks_back == []


# ---------------------------------------------------------------------------------------------------------------
# Causality: no module lets a future token change a past logit


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: ",".join(x.split("=")[0][2:] for x in f))
def test_future_tokens_never_change_past_logits(flags):
    assert_future_never_changes_past(live_model(*flags), tokens_with_docs(512, [0, 300]))


@pytest.mark.parametrize("flag", ["--smear=true", "--key_offset=true", "--bigram_rows=4096"])
def test_look_back_modules_cross_document_boundaries(flag):
    """Smear, the key offset and the bigram embedding cross document boundaries (as in the recipe): changing the
    last token of a document changes the next document (smear and bigram: its first token; the key offset: its
    second, the first query to see more than one key). Without them the documents are separate."""
    x = tokens_with_docs(512, [0, 300])
    y = x.clone()
    y[299] = (x[299] + 1) % 50000  # last token of the first document; 300 is the next document's EOT
    with torch.no_grad():
        base = live_model()
        torch.testing.assert_close(base(y)[300:], base(x)[300:])
        model = live_model(flag)
        first = 301 if flag.startswith("--key_offset") else 300
        assert not torch.allclose(model(y)[first], model(x)[first])
        torch.testing.assert_close(model(y)[300:first], model(x)[300:first])
        torch.testing.assert_close(model(y)[:299], model(x)[:299])


# ---------------------------------------------------------------------------------------------------------------
# Residual stream: x-lambda init and sigmoid skips


# ---------------------------------------------------------------------------------------------------------------
# Training wiring: every new parameter gets a gradient and an optimizer


def test_every_new_parameter_learns_and_has_one_optimizer():
    args = smoke_args(*ALL)
    model = live_model(*ALL)
    x = tokens_with_docs(513, [0, 200])
    model(x[:-1], x[1:]).backward()
    new = {n: p for n, p in model.named_parameters() if any(k in n for k in (
        "smear.", "bigram.", "skip_weights", "key_offset", "ve_gate.", "xsa.", "out_gate."))}
    assert {n.split(".")[-1] for n in new} >= {"gate", "lam", "weight", "alpha", "skip_weights"}
    for name, p in new.items():
        assert p.grad is not None and p.grad.any(), name
    groups = tg.param_groups(model, args)
    muon = {id(p) for p in groups["matrices"]}
    gates = [m.weight for m in model.modules() if isinstance(m, attn_gate_feature.AttentionGate)]
    assert gates and all(id(w) in muon for w in gates)  # r28's choice: the (heads, 12) gates train with Muon
    # the record's: Adam's
    ve_gates = [m.weight for m in model.modules() if isinstance(m, ve_gate_feature.ValueEmbedGate)]
    assert ve_gates and [id(w) for w in groups["ve_gate"]] == [id(w) for w in ve_gates]
    opts = tg.build_optimizers(model, args)
    owned = [id(p) for opt in opts for g in opt.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_all_flags_train_a_few_steps():
    args = smoke_args(*ALL, "--num_iterations=3")
    torch.manual_seed(0)
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(3):
        tokens = torch.randint(0, 50257, (args.micro_batches, args.seq_len + 1), generator=gen)
        tokens[:, [0, 100]] = tg.EOT_TOKEN
        micro = [(t[:-1].int(), t[1:].long()) for t in tokens]
        window = torch.tensor(tg.long_window_blocks(step, args), dtype=torch.int32)
        losses.append(tg.train_step(model, opts, micro, window, args, step, 1).item())
    assert all(math.isfinite(v) for v in losses)
    assert model.bigram.table.weight.any() and model.smear.lam.item() != 0


@pytest.mark.parametrize("extra", [[], ["--n_kv_heads=1"]], ids=["mha", "mqa"])
def test_all_flags_trace_as_one_graph_in_bf16(extra):
    """What a GPU run sees: bf16 embeddings (main() casts every nn.Embedding, the bigram table included) and
    torch.compile(fullgraph=True); dynamo's trace (eager backend: no inductor on 2 cores) must not break."""
    model = live_model(*ALL, *extra)
    assert_traces_as_one_graph_in_bf16(model, tokens_with_docs(512, [0, 200]))


# ---------------------------------------------------------------------------------------------------------------
# Decoding, configuration checks, describe_model, the presets


def test_kv_cache_decoding_with_per_token_hooks_and_refusal_for_look_back():
    model = live_model("--attn_gate=true", "--ve_gate=true", "--xsa_layers=1,3").eval()
    x = tokens_with_docs(256, [0, 100])
    with torch.no_grad():
        full = model.logits(model.hidden(x, 2))
    torch.testing.assert_close(cached_logits(model, x, 2), full, rtol=1e-4, atol=1e-4)
    for flag in ("--smear=true", "--key_offset=true", "--bigram_rows=64"):
        with pytest.raises(NotImplementedError, match=flag.split("=")[0]):
            live_model(flag).eval().hidden(x[:10], 2, cache=tg.KVCache())


@pytest.mark.parametrize("flags, message", [
    (["--xsa_layers=2"], "xsa_layers names blocks \\[2\\] without attention"),
    (["--xsa_layers=1,x"], "comma-separated block indices"),
    (["--attn_gate=true", "--mla_kv_rank=32"], "--attn_gate act on the heads"),
    (["--key_offset=true", "--rope=canonical"], "--rope=canonical rotates them all"),
    (["--bigram_rows=1"], "must be 0 \\(off\\) or >= 2"),
])
def test_bad_frontier_model_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


FULL = ["--smear=true", "--attn_gate=true", "--key_offset=true", "--ve_gate=true", "--xsa_layers=2,4,5,8,9,11"]


@pytest.fixture(scope="module")
def full_model():
    """The 768-dim, 12-block model with every per-head flag and smear (no bigram table: 290M zeros)."""
    args = tg.apply_overrides(tg.Hyperparameters(), FULL)
    tg.check_config(args, 8)
    return tg.build_model(args), args


def test_full_size_hooks_sit_on_the_mapped_blocks(full_model):
    model, _ = full_model
    on = lambda name, cls: [i for i, b in enumerate(model.blocks) if b.attn is not None and
                            isinstance(getattr(b.attn, name), cls)]
    # the long-window blocks with attention (7 has none)
    assert on("key_offset", key_offset_feature.KeyOffset) == [0, 4, 11]
    assert on("xsa", xsa_feature.ExclusiveSelfAttention) == [2, 4, 5, 8, 9, 11]
    # the blocks that read a value embedding
    assert on("ve_gate", ve_gate_feature.ValueEmbedGate) == [0, 1, 2, 9, 10, 11]
    assert on("out_gate", attn_gate_feature.AttentionGate) == [i for i in range(12) if i != 7]
    assert model.blocks[2].attn.xsa.alpha.shape == (6,) and model.blocks[0].attn.out_gate.weight.shape == (6, 12)


def test_describe_model_counts_the_new_parameters_and_gate_flops(full_model):
    model, args = full_model
    assert tg.count_params(model) - 275_598_388 == 11 * 6 * 12 + 6 * 6 * 12 + 6 * 6 + 13
    text = tg.describe_model(model, args)
    assert "attention 25,953,538" in text and "block/skip scalars 43" in text  # 25,952,278 + 1,260; 30 + 13
    gate_kinds = (attn_gate_feature.AttentionGate, ve_gate_feature.ValueEmbedGate)
    gates = [m for m in model.modules() if isinstance(m, gate_kinds)]
    assert sum(map(tg.dense_flops_per_token, gates)) == 2 * (11 + 6) * 6 * 12  # a 12-input dot per head and gate
    assert "attention 88.3M" in text  # + 2,448 FLOPs: below the print's 0.1M resolution


def test_frontier_presets_carry_the_model_half():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"])
    tg.check_config(args, 8)
    assert (args.smear, args.key_offset, args.ve_gate, args.skip_gate) == (True,) * 4
    assert args.resid_lambda_init == 1.1 and args.bigram_rows == 377_280  # XSA, gates: test_mudd_gates.py
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    tg.check_config(smoke, 1)
    model = tg.build_model(smoke)
    assert isinstance(model.smear, smear_feature.Smear) and model.bigram.rows == 8192
    assert model.skips_into[2] == [(0, 1)] and model.ve_table == [None, 0, None, 1]
    assert isinstance(model.mudd_final, mudd_feature.MuddFinalMix)  # MUDD j=1
    assert isinstance(model.blocks[3], mudd_feature.MuddBlock)  # MUDD j=0


# ---------------------------------------------------------------------------------------------------------------
# The recipe's 11-layer shape: per-block windows, value-embedding layers, listed skips, backout, inits


@pytest.fixture(scope="module")
def frontier_model():
    """--preset=frontier without its 290M-row bigram table (its count is checked by arithmetic)."""
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier", "--bigram_rows=0"])
    tg.check_config(args, 8)
    torch.manual_seed(0)
    return tg.build_model(args), args


def test_frontier_preset_builds_the_recipes_eleven_layers(frontier_model):
    model, args = frontier_model
    assert len(model.blocks) == 11 and [i for i, b in enumerate(model.blocks) if b.attn is None] == [6]
    assert model.window_kind == list("SSSLSSSSSSL")  # long windows on 3 and 10
    assert model.ve_table == [None, 0, 1, None, None, None, None, None, 2, 3, 4]  # five tables, one block each
    assert [(w, src, dst) for dst, into in enumerate(model.skips_into) for w, src in into] == [(0, 3, 6)]
    assert model.skip_weights.tolist() == [-1.5] and isinstance(model.skip_gate, skip_gate_feature.SigmoidSkipWeights)
    # MUDD (3.5): the j=1 mix of c0, c7 (init -0.5: the backout of r40), c9, VE_0, c3; block 10 runs j=0 on c7
    assert model.mudd_final.sources == [(False, "in"), (False, 7), (False, 9), (True, 0), (False, 3)]
    assert isinstance(model.blocks[10], mudd_feature.MuddBlock) and model.blocks[10].source == 7
    on = lambda name, cls: [i for i, b in enumerate(model.blocks) if b.attn is not None and
                            isinstance(getattr(b.attn, name), cls)]
    assert on("key_offset", key_offset_feature.KeyOffset) == [3, 10]
    assert on("xsa", mudd_feature.GatedExclusiveSelfAttention) == [1, 3, 4, 7]
    assert on("out_gate", mudd_feature.GatedHeadScale) == [3, 10]  # r85's [H]
    assert not on("out_gate", attn_gate_feature.AttentionGate)
    assert on("ve_gate", ve_gate_feature.ValueEmbedGate) == [1, 2, 8, 9]  # block 10's value embedding: MUDD's m6, m7
    # inits (recipe 3.1-3.2): head N(0, 0.005^2), value embeddings N(0, 0.01^2), attention outputs uniform
    assert model.lm_head.weight.std().item() == pytest.approx(0.005, rel=0.01)
    assert all(ve.weight.std().item() == pytest.approx(0.01, rel=0.01) for ve in model.value_embeds)
    bound = 3 ** 0.5 * 0.5 / 768 ** 0.5
    proj = model.blocks[0].attn.c_proj.weight
    assert proj.abs().max().item() <= bound and proj.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.01)
    assert torch.equal(model.embed.weight, model.lm_head.weight[:50257])  # tied at start (--untie_step=847)


def test_frontier_describe_model_prints_parameters_and_flops(frontier_model):
    model, args = frontier_model
    text = tg.describe_model(model, args)
    bigram = 377_280 * 768 + 9 * 65  # the table and the gates' 9 bigram weights (a W2 row and a b each)
    total = tg.count_params(model) + bigram
    # MUDD: + 49,477 (j=1) + 50,062 (j=0) - 1 lam - 2 lambdas - 72 VE gate; gates (r85): + 50,843 (x0, 26 values)
    # + 51,818 (layer 4, 41 with DC's w1, w2) - 720 sigmoid gates - 36 static XSA alphas + 18 lambdas (4 a
    # sub-layer block, 2 in block 6) - 1 bigram gain - 1 gate scale (the record's one s for both gates)
    assert total == 635_668_799, total
    assert f"= {tg.count_params(model):,}" in text and "embeddings 231,584,256" in text  # 50,257 x 768 x (1 + 5)
    assert "head tied to the embedding until step 847" in text and "forward FLOPs/token:" in text
    assert "stages: steps" in tg.stage_table(args)


def test_skip_pairs_listing_the_unet_equal_the_default():
    torch.manual_seed(0)
    default = randomize_zero_matrices(tg.build_model(smoke_args()))
    listed = tg.build_model(smoke_args("--skip_pairs=1:2,0:3"))
    listed.load_state_dict(default.state_dict())
    x = tokens_with_docs(256, [0, 100])
    with torch.no_grad():
        assert torch.equal(default(x), listed(x))


def test_per_block_window_pattern_and_value_embed_layers():
    args = smoke_args("--window_pattern=SLLS", "--value_embed_layers=2")
    assert tg.window_kinds(args) == list("SLLS") and tg.value_embed_tables(args) == [None, None, 0, None]
    assert tg.window_kinds(smoke_args("--window_pattern=LS")) == list("LSSL")  # half: mirrored, as before


@pytest.mark.parametrize("flags,message", [
    (["--num_layers=5", "--window_pattern=LSSSL"], "an odd depth needs its skips listed"),
    (["--num_layers=5", "--skip_pairs=1:3", "--no_attn_layers=2"], "num_layers=5 \\(one per block\\)"),
    (["--value_embed_layers=1,2"], "must name num_value_embeds=1 different blocks"),
    (["--skip_pairs=2:1"], "each src:dst needs 0 <= src < dst"),
    (["--skip_pairs=1-2"], "src:dst pairs such as"),
    (["--backout_layer=4"], "--backout_layer=4 must be a block in 0..3"),
    (["--attn_proj_init=normal"], "valid values: zero, uniform"),
])
def test_bad_shape_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


def test_odd_depth_with_listed_skips_builds():
    args = smoke_args("--num_layers=5", "--window_pattern=LSSSL", "--skip_pairs=1:3", "--no_attn_layers=2")
    model = tg.build_model(args)
    assert len(model.blocks) == 5 and model.skips_into[3] == [(0, 1)]
    x = tokens_with_docs(128, [0])
    assert model(x).shape == (128, 50304)
