"""Paired-head attention (--paired_head_layers; frontier recipe 3.4, r58, features/paired_heads.py). The doubled mask by
hand in both representations (dense, BlockMask) and compiled FlexAttention against dense SDPA on it; the paired layer
against a slow reference (the record's layout: slot g pairs heads g and g + H/2, head h turned by the phase of
position 2t + h mod 2; explicit interleave, dense softmax, de-interleave) forward and backward, with and without the
per-head hooks; causality; the window counted in doubled positions; the default untouched; the flag checks; a short
smoke run. Per-pair Muon: tests/features/test_muon_qk_pairs.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import features.attn_gate as attn_gate_feature
import features.key_offset as key_offset_feature
import features.paired_heads as paired_heads
import features.ve_gate as ve_gate_feature
import train_gpt as tg
from conftest import (assert_future_never_changes_past, assert_traces_as_one_graph_in_bf16, block_mask_as_dense,
                      live_model, smoke_args, summary_of, tokens_with_docs)

BLOCK = tg.BLOCK_SIZE
PAIRED = ["--num_heads=4", "--paired_head_layers=0,1"]  # smoke: 4 blocks, attention in 0 (L), 1 (S), 3 (L)


def window(blocks: int) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.int32)


def reference_doubled_mask(token_docs: torch.Tensor, window_blocks: int) -> torch.Tensor:
    """(2T, 2T) allowed (query, key) positions, written in tokens and heads: position p is token p // 2 of pair head
    p % 2; a key is visible iff it is of the query's document, of an earlier token or of the same token and a
    head not after the query's, and its 128-position block is among the last max(window, 1) blocks."""
    p = torch.arange(2 * len(token_docs))
    t, s = p // 2, p % 2
    same_doc = token_docs[t][:, None] == token_docs[t][None, :]
    earlier = (t[:, None] > t[None, :]) | ((t[:, None] == t[None, :]) & (s[:, None] >= s[None, :]))
    in_window = p[:, None] // BLOCK - p[None, :] // BLOCK < max(window_blocks, 1)
    return same_doc & earlier & in_window


def paired_masks(model, inputs, blocks: int) -> dict:
    return model.attention_masks(inputs, window(blocks))


# ---------------------------------------------------------------------------------------------------------------
# The doubled mask


def test_doubled_mask_by_hand_dense_and_block():
    """256 tokens, documents from tokens 0 and 40: 512 doubled positions (4 blocks of 128), document A at
    positions 0..79, B at 80..511."""
    inputs = tokens_with_docs(256, [0, 40])
    model = tg.build_model(smoke_args("--paired_head_layers=0,1"))
    token_docs = tg.document_ids(inputs)
    for blocks, count in ((4, 80 * 81 // 2 + 432 * 433 // 2),  # no window effect: both triangles
                          (1, 80 * 81 // 2 + 48 * 49 // 2 + 3 * (128 * 129 // 2))):  # B's queries in own block
        dense = paired_masks(model, inputs, blocks)["paired_L"]
        assert dense.shape == (512, 512) and int(dense.sum()) == count
        assert torch.equal(dense, reference_doubled_mask(token_docs, blocks))
    dense = paired_masks(model, inputs, 2)["paired_L"]
    allowed = lambda q, k: bool(dense[q, k])
    assert allowed(21, 20) and not allowed(20, 21)  # token 10: head 1 sees head 0's key, not the reverse
    assert allowed(21, 0) and allowed(20, 1) and allowed(21, 21)  # both heads of earlier tokens, itself
    assert not allowed(100, 79) and allowed(100, 80)  # token 50 (document B) never sees token 39 (A)
    assert allowed(256, 128) and not allowed(256, 127)  # window 2 blocks: token 128 sees tokens 64.. only
    assert paired_masks(model, inputs, 2)["S"].shape == (256, 256)  # the token masks are still built
    # short window (halved): the "S" kind of a paired block
    assert torch.equal(paired_masks(model, inputs, 2)["paired_S"], reference_doubled_mask(token_docs, 1))

    docs = paired_heads.paired_document_ids(inputs)
    assert torch.equal(docs, token_docs.repeat_interleave(2)) and docs[79] == 1 and docs[80] == 2
    for blocks in (1, 2, 4):
        bm = tg.flex_block_mask(inputs, window(blocks), docs=docs)
        assert torch.equal(block_mask_as_dense(bm), reference_doubled_mask(token_docs, blocks))
    bm = tg.flex_block_mask(inputs, window(2), docs=docs)
    partial = [sorted(bm.kv_indices[0, 0, q, :int(bm.kv_num_blocks[0, 0, q])].tolist()) for q in range(4)]
    full = [sorted(bm.full_kv_indices[0, 0, q, :int(bm.full_kv_num_blocks[0, 0, q])].tolist()) for q in range(4)]
    assert partial == [[0], [0, 1], [2], [3]]  # block 0 holds both documents; diagonals are partial
    assert full == [[], [], [1], [2]]  # blocks 1..3 lie inside document B


def test_model_builds_the_doubled_block_masks_when_flex_is_on(monkeypatch):
    model = tg.build_model(smoke_args("--paired_head_layers=0"))
    inputs = tokens_with_docs(256, [0, 40, 200])
    monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
    masks = paired_masks(model, inputs, 2)
    assert set(masks) == {"L", "S", "paired_L"}  # block 0 is a long-window block: only its kind is built
    assert torch.equal(block_mask_as_dense(masks["paired_L"]),
                       reference_doubled_mask(tg.document_ids(inputs), 2))


def test_compiled_flex_attention_on_the_doubled_sequence_equals_sdpa():
    """The GPU path's kernel on CPU: compiled FlexAttention with the doubled BlockMask against SDPA with the dense
    doubled mask, on interleaved q, k, v (forward only: no FlexAttention backward on CPU)."""
    inputs = tokens_with_docs(512, [0, 70, 200, 201, 390])
    docs = paired_heads.paired_document_ids(inputs)
    g = torch.Generator().manual_seed(0)
    q, k, v = (paired_heads.interleave_pairs(torch.randn(1, 512, 4, 32, generator=g)).transpose(1, 2) for _ in range(3))
    compiled = torch.compile(tg.flex_attention, dynamic=False)
    for blocks in (1, 3):
        bm = tg.flex_block_mask(inputs, window(blocks), docs=docs)
        dense = tg.dense_attention_mask(inputs, window(blocks), docs=docs)
        torch.testing.assert_close(compiled(q, k, v, block_mask=bm, scale=0.2), tg.attend(q, k, v, dense, 0.2),
                                   rtol=1e-5, atol=1e-5)


def test_paired_model_traces_as_one_graph_in_bf16():
    """What a GPU run sees: bf16 embeddings and torch.compile(fullgraph=True); dynamo's trace (eager backend) of
    the paired masks and layers must not break."""
    model = live_model(*PAIRED, "--attn_gate=true", "--ve_gate=true", "--key_offset=true")
    assert_traces_as_one_graph_in_bf16(model, tokens_with_docs(512, [0, 200]))


@pytest.mark.slow
def test_compiled_paired_model_with_block_masks_equals_eager_dense(monkeypatch):
    """The GPU path of the whole model on CPU: torch.compile with FLEX_ATTENTION_ON_CPU (doubled BlockMasks) against
    the eager dense-mask model, two windows and two layouts, one graph (tens of seconds of inductor compile: --slow)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model = live_model(*PAIRED).eval()
    cases = [(tokens_with_docs(512, eot, seed=i), w) for i, eot in enumerate([[0, 70, 200, 201, 390], [300, 301]])
             for w in (1, 3)]
    with torch.no_grad():
        refs = [model(x, None, window(w)) for x, w in cases]
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
        outs = [compiled(x, None, window(w)) for x, w in cases]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------------------------
# The paired layer against a slow reference


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Our rotary layout (chunked halves): (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * theta.cos() + x2 * theta.sin(), x2 * theta.cos() - x1 * theta.sin()], dim=-1)


def reference_paired_attention(attn, x, ve, token_docs, window_blocks, key_parity=None):
    """Slow paired-head attention in the record's layout (r58): slot g's sequence holds token t of head g at position
    2t and of head g + H/2 at 2t + 1; head h of token t is turned by the rotary phase of position 2t + h mod 2 (the
    record rotates its (T, H/2, 2 head_dim) view), keys by key_parity[h] (default h mod 2) instead; the key offset
    after rotary in token order (the recipe's order), a dense softmax under reference_doubled_mask, the result
    written back to (token, head), the output gate, the projection."""
    B, T, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = (F.linear(x, attn.qkv_w[i]).view(B, T, H, hd) for i in range(3))
    parity = torch.arange(H) % 2
    key_parity = parity if key_parity is None else key_parity
    theta_q, theta_k = ((2 * torch.arange(T)[:, None] + p[None, :])[..., None].float() * attn.rotary.frequencies()
                        for p in (parity, key_parity))  # (T, H, hd / 2)
    q, k = rotate(tg.norm(q), theta_q), attn.key_offset(rotate(tg.norm(k), theta_k))
    v = attn.lambdas[0] * v if ve is None else attn.lambdas[0] * v + attn.lambdas[1] * attn.ve_gate(ve.view_as(v), x)
    allowed = reference_doubled_mask(token_docs, window_blocks)
    y = torch.zeros(B, T, H, hd)
    for g in range(H // 2):
        Q, K, V = (torch.stack([t[:, u, g + s * H // 2] for u in range(T) for s in (0, 1)], dim=1) for t in (q, k, v))
        scores = (Q @ K.transpose(1, 2) * attn.attn_scale).masked_fill(~allowed, float("-inf"))
        Y = scores.softmax(-1) @ V  # (B, 2T, hd)
        for s in (0, 1):
            y[:, :, g + s * H // 2] = Y[:, s::2]
    return F.linear(attn.out_gate(y, x).reshape(B, T, -1), attn.c_proj.weight)


@pytest.mark.parametrize("hooks", [[], ["--attn_gate=true", "--ve_gate=true", "--key_offset=true"]],
                         ids=["plain", "with_hooks"])
def test_paired_attention_equals_the_slow_reference_forward_and_backward(hooks):
    model = live_model(*PAIRED, *hooks)
    inputs = tokens_with_docs(256, [0, 40, 170])
    token_docs = tg.document_ids(inputs)
    masks = paired_masks(model, inputs, 2)
    attn = model.blocks[0].attn  # a long-window block with a value embedding
    assert isinstance(attn, paired_heads.PairedSelfAttention) and model.mask_key[:2] == ["paired_L", "paired_S"]
    if hooks:
        assert [type(attn.key_offset), type(attn.ve_gate), type(attn.out_gate)] == \
            [key_offset_feature.KeyOffset, ve_gate_feature.ValueEmbedGate, attn_gate_feature.AttentionGate]
    g = torch.Generator().manual_seed(1)
    x = tg.norm(torch.randn(1, 256, 128, generator=g)).requires_grad_()
    ve = torch.randn(1, 256, 128, generator=g)
    out = attn(x, ve, masks["paired_L"])
    params = [p for p in attn.parameters()]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_paired_attention(attn, x_ref, ve, token_docs, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *params])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip([("x", None), *attn.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        assert want.abs().sum() > 0, name
    # block 1: the short window (halved: 1 block of doubled positions), no value embedding
    short = model.blocks[1].attn
    assert model.ve_table[1] is None
    with torch.no_grad():
        torch.testing.assert_close(short(x, None, masks["paired_S"]),
                                   reference_paired_attention(short, x, None, token_docs, 1), rtol=1e-5, atol=1e-6)


def test_paired_gqa_pairs_the_kv_heads_too():
    """--n_kv_heads=2 with 4 query heads: query slot g (heads g, g + 2) reads K/V slot g // 2 = 0 (kv heads 0, 1: the
    ones heads g and g + 2 read without pairing); the paired layer equals the reference run on the K/V heads repeated
    per query head (GQA = MHA with shared K/V), each key turned by its own K/V head's phase."""
    model = live_model("--num_heads=4", "--n_kv_heads=2", "--paired_head_layers=0")
    attn = model.blocks[0].attn
    assert isinstance(attn, paired_heads.PairedGroupedQueryAttention)
    inputs = tokens_with_docs(256, [0, 100])
    g = torch.Generator().manual_seed(2)
    x, ve = tg.norm(torch.randn(1, 256, 128, generator=g)), torch.randn(1, 256, 64, generator=g)
    with torch.no_grad():
        out = attn(x, ve, paired_masks(model, inputs, 2)["paired_L"])
        # the same weights as MHA: q from q_w, K/V pair 0 (kv heads 0, 1) for both query pairs
        mha = paired_heads.PairedSelfAttention(128, 4, attn.attn_scale, attn.rotary.max_seq_len // 2)
        mha.load_state_dict(attn.state_dict(), strict=False)  # lambdas and c_proj
        share = lambda w: w.view(2, -1, *w.shape[1:]).repeat_interleave(2, dim=0).flatten(0, 1)
        k_w, v_w = attn.kv_w  # K/V heads 0, 1 -> MHA heads 0, 1, 2, 3 = kv 0, 0, 1, 1
        mha.qkv_w.copy_(torch.stack([attn.q_w, share(k_w), share(v_w)]))
        ref = reference_paired_attention(mha, x, share(ve[0].T).T[None], tg.document_ids(inputs), 2,
                                         key_parity=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_pairing_changes_only_which_keys_a_query_sees():
    """Same seed: the paired model has the unpaired model's parameters (names, shapes, values) and count; its
    outputs differ; its attention modules are the paired classes on the listed blocks only."""
    plain, paired = live_model("--num_heads=4"), live_model(*PAIRED)
    assert tg.count_params(plain) == tg.count_params(paired)
    a, b = plain.state_dict(), paired.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(blk.attn).__name__ for blk in paired.blocks] == \
        ["PairedSelfAttention", "PairedSelfAttention", "NoneType", "CausalSelfAttention"]
    assert paired.blocks[0].attn.rotary.cos.shape[0] == 2 * plain.blocks[0].attn.rotary.cos.shape[0]
    x = tokens_with_docs(256, [0, 90])
    with torch.no_grad():
        assert not torch.allclose(plain(x), paired(x))


# ---------------------------------------------------------------------------------------------------------------
# Causality and the window


@pytest.mark.parametrize("flags", [PAIRED, ["--paired_head_layers=0,1,3", "--attn_gate=true", "--ve_gate=true",
                                            "--key_offset=true", "--n_kv_heads=0"]], ids=["paired", "all_hooks"])
def test_future_tokens_never_change_past_logits(flags):
    model = live_model(*flags)
    x = tokens_with_docs(512, [0, 300])
    logits = assert_future_never_changes_past(model, x)
    with torch.no_grad():
        z = x.clone()
        z[250] = (x[250] + 1) % 50000  # inside the first document: the second one never sees it
        torch.testing.assert_close(model(z)[300:], logits[300:])


def test_window_is_counted_in_doubled_positions():
    """One document of 256 tokens, window 1 block: the unpaired layer's token 127 sees tokens 0..127 (its block
    of 128 tokens); the paired layer's sees tokens 64..127 only (doubled positions 128..255, its block)."""
    plain, paired = live_model("--num_heads=4"), live_model(*PAIRED)
    inputs = tokens_with_docs(256, [0])
    g = torch.Generator().manual_seed(3)
    x = tg.norm(torch.randn(1, 256, 128, generator=g))

    def sees(model, mask_key, t, u):  # does the attention output at token t change when token u's input does
        attn, mask = model.blocks[0].attn, paired_masks(model, inputs, 1)[mask_key]
        x2 = x.clone()
        x2[0, u] += 1.0
        with torch.no_grad():
            return not torch.allclose(attn(x, None, mask)[0, t], attn(x2, None, mask)[0, t], rtol=0, atol=1e-7)
    assert sees(plain, "L", 127, 0) and sees(plain, "L", 127, 63) and not sees(plain, "L", 128, 127)
    assert sees(paired, "paired_L", 127, 64) and not sees(paired, "paired_L", 127, 63)
    assert sees(paired, "paired_L", 63, 0) and not sees(paired, "paired_L", 64, 63)


def test_describe_model_counts_paired_scores_per_doubled_position():
    """At the same window in blocks a paired query sees as many keys (doubled positions), the keys of half the
    tokens: parameters and FLOPs equal the unpaired model's. Only a window longer than the sequence differs: the
    unpaired keys stop at the 512 tokens, the paired ones at the 1024 doubled positions."""
    def describe(*flags):
        args = smoke_args(*flags)
        return tg.describe_model(tg.build_model(args), args)
    plain, paired = describe("--num_heads=4"), describe(*PAIRED)
    assert plain.split("architecture")[1].split(", mlp")[0] != paired.split("architecture")[1].split(", mlp")[0]
    assert plain.split("params:")[1] == paired.split("params:")[1]  # params and FLOPs lines
    assert "scores 0.4M at windows 320/64" in paired  # 2 x (320 + 64 + 320) keys x 4 heads x (32 + 32)
    wide = "--window_schedule_tokens=4096"  # final windows 32 / 16 blocks, over the 512-token sequence
    plain, paired = describe("--num_heads=4", wide), describe(*PAIRED, wide)
    assert "scores 0.8M" in plain  # 2 x 512 keys x 256 x 3 layers = 786,432
    assert "scores 1.3M" in paired  # 2 x (1024 + 1024 + 512) x 256 = 1,310,720


# ---------------------------------------------------------------------------------------------------------------
# Per-pair Muon


# ---------------------------------------------------------------------------------------------------------------
# The default, the flags, the presets, a smoke run


def test_default_is_unchanged():
    args = smoke_args()
    torch.manual_seed(0)
    model = tg.build_model(args)
    assert model.sequence_masks == {} and model.mask_key == model.window_kind
    assert not [m for m in model.modules() if isinstance(m, paired_heads.PairedHeads)]
    assert set(paired_masks(model, tokens_with_docs(256, [0]), 2)) == {"L", "S"}
    muon = tg.build_optimizers(model, args)[1]
    assert all(g["split"] == () for g in muon.param_groups)
    X = torch.ones(2, 3, 4)
    assert len(tg.muon_pieces(X, ())) == 1 and tg.muon_pieces(X, ())[0] is X
    with torch.device("meta"):  # the full-size shapes without their 1.1 GB of values
        full = tg.build_model(tg.Hyperparameters())
        paired = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--paired_head_layers=0,2,5,9"]))
    assert tg.count_params(full) == tg.count_params(paired) == 275_598_388


@pytest.mark.parametrize("flags, message", [
    (["--paired_head_layers=2"], "paired_head_layers names blocks \\[2\\] without attention"),
    (["--paired_head_layers=0,x"], "comma-separated block indices"),
    (["--paired_head_layers=9"], "paired_head_layers names blocks \\[9\\] without attention"),
    (["--paired_head_layers=0", "--num_heads=1"], "num_heads=1 is odd"),
    (["--muon_qk_pairs=true", "--num_heads=1"], "--muon_qk_pairs pairs heads 2j, 2j\\+1; num_heads=1 is odd"),
    (["--paired_head_layers=0", "--mla_kv_rank=32"], "MLA \\(--mla_kv_rank > 0\\) has no per-head q/k"),
    (["--muon_qk_pairs=true", "--mla_kv_rank=32"], "--muon_qk_pairs pairs the heads"),
    (["--paired_head_layers=0", "--num_heads=4", "--n_kv_heads=1"], "--n_kv_heads=1 is odd"),
    (["--paired_head_layers=0,1", "--xsa_layers=1,3"], "both name blocks \\[1\\]; a paired block has no XSA"),
])
def test_bad_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


def test_kv_cache_decoding_refuses_paired_layers():
    model = live_model("--paired_head_layers=0").eval()
    with pytest.raises(NotImplementedError, match="--paired_head_layers"):
        model.hidden(tokens_with_docs(10, [0]), 2, cache=tg.KVCache())


def test_frontier_presets_pair_the_recipe_layers():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"])
    tg.check_config(args, 8)
    assert args.paired_head_layers == "0,2,5,9" and args.muon_qk_pairs
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    tg.check_config(smoke, 1)
    assert smoke.paired_head_layers == "0" and smoke.muon_qk_pairs


def test_smoke_run_with_paired_layers_learns(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", f"--train_files={train}", f"--val_files={val}", f"--records_dir={tmp_path}",
                    "--num_heads=4", "--paired_head_layers=0,3", "--muon_qk_pairs=true", "--num_iterations=4",
                    "--val_every=0"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = summary_of(out)
    assert summary["status"] == "ok" and summary["steps"] == 4
    # the zero head starts at the uniform loss ln(50304) = 10.83 (the smoke run's first validation)
    assert math.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < math.log(50304) - 1.5, summary
