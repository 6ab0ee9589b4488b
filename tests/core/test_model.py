"""Model: attention masks (FlexAttention block-mask structure vs the dense SDPA mask; compiled FlexAttention outputs
are compared in test_gpu_paths.py), shapes, parameter count, value-embedding layout, U-net pairing, initial loss,
causality."""
import math

import pytest
import torch

import train_gpt as tg
from conftest import smoke_model

EOT = tg.EOT_TOKEN


def tokens_with_docs(T, eot_positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50000, (T,), generator=g)
    x[list(eot_positions)] = EOT
    return x


# documents boundaries inside 128-blocks, a one-token document, a document spanning three blocks
SEQ = tokens_with_docs(512, [0, 70, 200, 201, 390])


def explicit_mask(inputs, window_blocks):
    docs = torch.cumsum(inputs == EOT, 0).tolist()
    T = len(inputs)
    return torch.tensor([[j <= i and docs[i] == docs[j] and i // 128 - j // 128 < window_blocks for j in range(T)]
                         for i in range(T)])


@pytest.mark.parametrize("window", [1, 2, 3, 4])
def test_dense_mask_is_document_causal_windowed(window):
    assert torch.equal(tg.dense_attention_mask(SEQ, window), explicit_mask(SEQ, window))


@pytest.mark.parametrize("window", [1, 2, 3])
def test_block_mask_structure_matches_dense_mask(window):
    dense = tg.dense_attention_mask(SEQ, torch.tensor(window))
    tiles = dense.view(4, 128, 4, 128).permute(0, 2, 1, 3).flatten(2)
    bm = tg.flex_block_mask(SEQ, torch.tensor(window))
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles.any(-1))  # visited blocks = blocks with any visible pair
    full = torch.zeros(4, 4, dtype=torch.bool)
    for q in range(4):
        n = bm.full_kv_num_blocks[0, 0, q]
        full[q, bm.full_kv_indices[0, 0, q, :n].long()] = True
    assert torch.equal(full, tiles.all(-1))  # mask_mod is skipped exactly where every pair is visible


def test_window_schedule():
    args = tg.Hyperparameters()
    assert tg.long_window_blocks(0, args) == 1  # 128 tokens
    assert tg.long_window_blocks(args.num_iterations, args) == 14  # 1792 tokens
    assert tg.long_window_blocks(args.num_iterations // 2, args) == math.ceil(864 / 128)
    assert [tg.lr_multiplier(s, args) for s in (0, 1061, 1770)] == [1.0, 1.0, pytest.approx(0.1)]
    assert tg.lr_multiplier(1416, args) == pytest.approx(0.1 + 0.9 * (354 / 1770) / 0.4)
    assert [tg.muon_momentum(s, args) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return tg.build_model(tg.Hyperparameters())


def test_default_parameter_count(default_model):
    V, Vp, d, L = 50257, 50304, 768, 12
    attn = 3 * d * d + d * d + 2  # merged qkv, output projection, value-mixing lambdas
    mlp = 2 * d * 4 * d
    expected = 4 * V * d + Vp * d + L * (mlp + 2) + (L - 1) * attn + L // 2
    count = tg.count_params(default_model)
    print(f"default config: {count:,} parameters")
    assert count == expected == 275_598_388
    m = default_model
    assert m.blocks[7].attn is None and all(b.attn is not None for i, b in enumerate(m.blocks) if i != 7)
    assert m.blocks[0].attn.qkv_w.shape == (3, 768, 768) and m.lm_head.weight.shape == (50304, 768)
    assert m.window_kind == list("LSSSLSSLSSSL")
    groups = tg.param_groups(m)
    assert all(p.ndim >= 2 for p in groups["matrices"]) and len(groups["scalars"]) == 12 + 11 + 1


def test_value_embedding_layout(default_model):
    assert default_model.ve_table == [0, 1, 2] + [None] * 6 + [0, 1, 2]


def test_initial_loss_is_log_vocab(default_model):
    x = tokens_with_docs(257, [0, 100])
    inputs, targets = x[:-1], x[1:]
    with torch.no_grad():
        loss = default_model(inputs, targets)
    assert abs(loss.item() - math.log(50304)) < 0.01  # the zero head: uniform over the padded vocabulary
    head, proj = default_model.lm_head.weight, default_model.blocks[10].mlp.c_proj.weight
    try:  # the same loss with a live head reads the blocks: an independent log-softmax, and a block that matters
        with torch.no_grad():
            head.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            live = default_model(inputs, targets)
            z = default_model.hidden(inputs) @ head.T
            manual = -torch.log_softmax(30 * torch.sigmoid(z / 7.5), -1)[torch.arange(256), targets].mean()
            proj.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
            changed = default_model(inputs, targets)
    finally:
        with torch.no_grad():
            head.zero_(), proj.zero_()
    assert abs(live.item() - math.log(50304)) > 0.05
    torch.testing.assert_close(live, manual, rtol=1e-5, atol=1e-5)
    assert abs(changed.item() - live.item()) > 1e-3


def test_unet_block_3_receives_block_0_output():
    model = smoke_model()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out0", o.detach()))
    model.blocks[3].register_forward_pre_hook(lambda m, i: seen.setdefault("in3", []).append(i[0].detach()))
    x = tokens_with_docs(256, [0])
    with torch.no_grad():
        model.skip_weights[-1] = 0.0
        model(x)
        model.skip_weights[-1] = 2.5
        model(x)
    torch.testing.assert_close(seen["in3"][1] - seen["in3"][0], 2.5 * seen["out0"], rtol=1e-4, atol=1e-4)


def test_outputs_and_causality():
    model = smoke_model()
    x = tokens_with_docs(512, [0, 300])
    logits = model(x)
    assert logits.shape == (512, 50304) and logits.dtype == torch.float32
    assert 0 < logits.min() and logits.max() < 30  # after the 30 * sigmoid(z / 7.5) softcap
    y = x.clone()
    y[400:] = torch.randint(0, 50000, (112,))
    torch.testing.assert_close(model(y)[:400], logits[:400])
    assert not torch.allclose(model(y)[400:], logits[400:])
    loss = model(x[:-1 - 127], x[1:-127])
    assert loss.ndim == 0 and loss.requires_grad


def test_documents_do_not_see_each_other():
    model = smoke_model()
    x = tokens_with_docs(512, [0, 300])
    y = x.clone()
    y[1:300] = torch.randint(0, 50000, (299,))  # change the whole first document
    # the second document (from its EOT on) sees only itself, within the window
    torch.testing.assert_close(model(y, window_blocks=4)[300:], model(x, window_blocks=4)[300:])


def test_eval_loss_chunking_matches_full_loss():
    model = smoke_model().eval()
    x = tokens_with_docs(1025, [0, 500])
    model.eval_chunk_tokens = 256
    with torch.no_grad():
        chunked = model(x[:-1], x[1:])
        full = torch.nn.functional.cross_entropy(model(x[:-1]), x[1:])
    torch.testing.assert_close(chunked, full)
