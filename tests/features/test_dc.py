"""Dynamically-composable attention (--dc_layers, --dc_window; issue 14; ../shared/docs/frontier_recipe.md section
3.4, r85's lightweight DC): the token-window mask (dense and BlockMask), the head mix against a float64 loop that
writes the recipe's formula out, the static and MUDD-gated weights, the model's causality and init, the flag checks
and the presets. Smoke-size models (4 blocks of 128 dims, 2 heads, block 2 without attention)."""
import math

import pytest
import torch

import features.dc as dc_feature
import features.mudd as mudd_feature
import train_gpt as tg
from conftest import assert_traces_as_one_graph_in_bf16, live_model, smoke_args, smoke_model, tokens_with_docs

DC = ["--dc_layers=1,3"]  # the GPT-2 vocabulary: documents need EOT
GATED = [*DC, "--sublayer_lambdas=true", "--mudd_gate_block=2"]


def reference_token_window(docs: torch.Tensor, tokens: int) -> torch.Tensor:
    T = len(docs)
    return torch.tensor([[s <= t and t - s < tokens and docs[s] == docs[t] for s in range(T)] for t in range(T)])


def test_token_window_mask_dense_and_block_mask():
    inputs = tokens_with_docs(512, [0, 60, 61, 300])
    docs = tg.document_ids(inputs)
    for tokens in (1, 112, 128, 200):
        dense = tg.dense_token_window_mask(inputs, tokens)
        assert torch.equal(dense, reference_token_window(docs, tokens))
        bm = tg.flex_token_window_mask(inputs, tokens)
        reach = -(-(tokens - 1) // 128)
        for qb in range(4):  # the visited key blocks: those the window reaches that share a document
            visited = sorted(bm.kv_indices[0, 0, qb, :int(bm.kv_num_blocks[0, 0, qb])].tolist())
            assert visited == [kb for kb in range(max(qb - reach, 0), qb + 1)
                               if dense[qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128].any()], (tokens, qb)


def test_compiled_flex_attention_on_the_token_window_equals_sdpa():
    """The GPU path's kernel on CPU: compiled FlexAttention with the token-window BlockMask against SDPA with the
    dense mask (forward only: no FlexAttention backward on CPU)."""
    inputs = tokens_with_docs(512, [0, 70, 200, 201, 390])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    compiled = torch.compile(tg.flex_attention, dynamic=False)
    bm, dense = tg.flex_token_window_mask(inputs, 112), tg.dense_token_window_mask(inputs, 112)
    torch.testing.assert_close(compiled(q, k, v, block_mask=bm, scale=0.2), tg.attend(q, k, v, dense, 0.2),
                               rtol=1e-5, atol=1e-5)


def reference_composition(y, q, k, v, scale, docs, tokens, w1, w2):
    """The recipe's formula in float64 loops: P_h(t, s) a softmax over the window in t's document, A(t, s) =
    sum_h w1n_h(t) P_h(t, s) with w1n = w1 / sqrt(mean_h w1^2 + 1e-6), y_h(t) += w2_h(t) sum_s A(t, s) v_h(s).
    q, k, v, y (H, T, d); w1, w2 (T, H)."""
    H, T, _ = q.shape
    q, k, v, w1, w2 = (t.double() for t in (q, k, v, w1, w2))
    out = y.double().clone()
    for t in range(T):
        window = [s for s in range(max(0, t - tokens + 1), t + 1) if docs[s] == docs[t]]
        P = torch.stack([torch.softmax(scale * torch.stack([q[h, t] @ k[h, s] for s in window]), 0)
                         for h in range(H)])  # (H, len(window))
        w1n = w1[t] / math.sqrt((w1[t] ** 2).mean().item() + 1e-6)
        A = (w1n[:, None] * P).sum(0)
        for h in range(H):
            out[h, t] += w2[t, h] * sum(A[i] * v[h, s] for i, s in enumerate(window))
    return out.float()


def test_compose_heads_against_the_loop():
    T, H, d = 256, 3, 8
    inputs = tokens_with_docs(T, [0, 90, 91])
    g = torch.Generator().manual_seed(0)
    y, q, k, v = (torch.randn(1, H, T, d, generator=g) for _ in range(4))
    w1, w2 = torch.randn(1, T, H, generator=g), torch.randn(1, T, H, generator=g)
    mask = tg.dense_token_window_mask(inputs, 20)
    out = dc_feature.compose_heads(y.transpose(1, 2), q, k, v, 0.3, mask, w1[..., None], w2[..., None])  # y token-major
    expected = reference_composition(y[0], q[0], k[0], v[0], 0.3, tg.document_ids(inputs), 20, w1[0], w2[0])
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=1e-5, atol=1e-5)
    static = dc_feature.DynamicComposition(H)  # per-head weights: the same with every token's weights equal
    with torch.no_grad():
        static.w1.copy_(w1[0, 5]), static.w2.copy_(w2[0, 5])
    expected = reference_composition(y[0], q[0], k[0], v[0], 0.3, tg.document_ids(inputs), 20,
                                     w1[0, 5].expand(T, H), w2[0, 5].expand(T, H))
    out = static(y.transpose(1, 2), q, k, v, 0.3, {"masks": {"dc": mask}})
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=1e-5, atol=1e-5)


def test_dc_at_init_changes_nothing_bit_for_bit():
    x = tokens_with_docs(256, [0, 100])
    with torch.no_grad():
        assert torch.equal(smoke_model(*DC)(x), smoke_model()(x))  # w2 = 0; w1, w2 are not random draws


def test_future_tokens_never_change_past_logits_and_dc_acts():
    model = live_model(*DC)  # w2 N(0, 0.5^2)
    assert [type(b.attn.dc) for b in model.blocks if b.attn is not None] == \
        [tg.PassThrough, dc_feature.DynamicComposition, dc_feature.DynamicComposition]
    x = tokens_with_docs(512, [0, 200])
    y = x.clone()
    y[400:] = tokens_with_docs(112, [], seed=1)
    with torch.no_grad():
        before, after = model(x), model(y)
        torch.testing.assert_close(after[:400], before[:400], rtol=0, atol=0)
        assert not torch.allclose(after[400:], before[400:])
        model.blocks[3].attn.dc.w2.zero_()
        assert not torch.allclose(model(x), before)  # block 3's DC did contribute


def test_gated_dc_reads_its_weights_from_the_second_gate():
    args = smoke_args(*GATED)
    before, after = mudd_feature.mudd_gate_outputs(args)
    assert ("gate.dc_w1_1", 2, 1.0) in before and ("gate.dc_w2_1", 2, 0.0) in before
    assert ("gate.dc_w1_3", 2, 1.0) in after and ("gate.dc_w2_3", 2, 0.0) in after
    model = live_model(*GATED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mudd_feature.MuddGate):
                m.w2.normal_(0, 0.3)
    assert type(model.blocks[3].attn.dc) is mudd_feature.GatedDynamicComposition
    x = tokens_with_docs(513, [0, 200])
    model(x[:-1], x[1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.any(), name
    frontier = mudd_feature.mudd_gate_outputs(tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"]))[1]
    assert sum(w for _, w, _ in frontier) == 41  # the recipe's second gate, DC's 12 included


def test_decoding_with_a_kv_cache_is_refused():
    model = tg.build_model(smoke_args(*DC)).eval()
    with pytest.raises(NotImplementedError, match="--dc_layers"):
        model.hidden(tokens_with_docs(128, [0]), 2, cache=tg.KVCache())


def test_dc_model_traces_as_one_graph_in_bf16():
    model = live_model(*GATED)
    assert_traces_as_one_graph_in_bf16(model, tokens_with_docs(256, [0, 100]))


@pytest.mark.parametrize("flags, message", [
    (["--dc_layers=2"], "must name different blocks with attention and without paired heads; \\[2\\]"),
    (["--dc_layers=0", "--paired_head_layers=0"], "without paired heads; \\[0\\]"),
    (["--dc_layers=1,1"], "a block twice"),
    (["--dc_layers=x"], "expected comma-separated block indices"),
    (["--dc_layers=1", "--n_kv_heads=1"], "it needs multi-head attention"),
    (["--dc_layers=1", "--dc_window=0"], "--dc_window=0 must be >= 1"),
])
def test_bad_dc_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        smoke_args(*flags)


def test_describe_model_counts_dc():
    args = smoke_args(*DC)
    text = tg.describe_model(tg.build_model(args), args)
    # per DC block: 2 calls x 2 x 112 keys x 2 heads x (64 + 64) dims = 114,688 FLOPs/token
    assert "DC 0.2M" in text and any("--dc_window" in w for w in tg.meaningless_flags(smoke_args("--dc_window=64")))
    assert tg.count_params(tg.build_model(args)) - tg.count_params(tg.build_model(smoke_args())) == 2 * 2 * 2


def test_frontier_presets_carry_dc():
    assert tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"]).dc_layers == "10"
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    tg.check_config(smoke, 1)
    model = tg.build_model(smoke)
    assert type(model.blocks[3].attn.dc) is mudd_feature.GatedDynamicComposition
    assert model.extra_masks["dc"].keywords == dict(tokens=112)
