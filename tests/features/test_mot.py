"""--mot: the GPT-2 byte table, the bytes each position sees (with and without --mot_pull_left), causality of
CharCrossAttention, optimizer routing, the default model unchanged, and the smoke preset training with it."""
import pytest
import torch

import features.mot as mot_feature
import train_gpt as tg
from conftest import randomize_zero_matrices, smoke_model, val_losses

tiktoken = pytest.importorskip("tiktoken")
S = 16


@pytest.fixture(scope="module")
def enc():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache
        pytest.skip(f"tiktoken gpt2 unavailable: {e}")


@pytest.fixture(scope="module")
def table(enc):
    return mot_feature.byte_table(S)


def test_a_table_built_under_the_meta_device_is_real_and_cached_real(enc):
    """meta_model builds the model on the meta device before the real one: the cached table must hold bytes."""
    path = tg.HERE / "data" / "local" / "byte_table_gpt2_3.pt"
    path.unlink(missing_ok=True)
    with torch.device("meta"):
        built = mot_feature.byte_table(3)
    cached = torch.load(path)
    assert not built.is_meta and not cached.is_meta and torch.equal(built, cached)
    assert row_bytes(cached[enc.encode(" hello")[0]]) == list(b"llo")


def row_bytes(row) -> list[int]:
    return [int(b) for b in row if b != mot_feature.BYTE_PAD]


def mot_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--mot=cross", *extra])


def test_table_is_integer_with_exact_right_aligned_bytes(enc, table):
    assert table.dtype in (torch.int16, torch.int32) and table.shape == (tg.GPT2_VOCAB, S)
    assert table.min() >= 0 and table.max() <= mot_feature.BYTE_EOT
    samples = [enc.encode(" hello")[0], enc.encode("!")[0], 0, 255, 50255]
    samples += [t for t in range(50256) if len(enc.decode_single_token_bytes(t)) > 1
                and any(b >= 0x80 for b in enc.decode_single_token_bytes(t))][:5]  # multi-byte UTF-8 pieces
    for t in samples:
        piece = list(enc.decode_single_token_bytes(t))
        assert table[t].tolist() == [mot_feature.BYTE_PAD] * (S - len(piece)) + piece, t
    assert table[tg.EOT_TOKEN].tolist() == [mot_feature.BYTE_PAD] * (S - 1) + [mot_feature.BYTE_EOT]


def test_truncation_keeps_the_last_bytes(enc, table):
    longest = max(range(50256), key=lambda t: len(enc.decode_single_token_bytes(t)))
    piece = enc.decode_single_token_bytes(longest)
    assert len(piece) > S
    assert bytes(table[longest].tolist()) == piece[-S:]


def test_round_trip_for_every_token_that_fits(enc, table):
    lookup = {}
    for t, row in enumerate(table.tolist()[:tg.EOT_TOKEN]):
        piece = enc.decode_single_token_bytes(t)
        if len(piece) <= S:
            real = tuple(b for b in row if b != mot_feature.BYTE_PAD)
            assert bytes(real) == piece, t
            assert lookup.setdefault(real, t) == t  # bytes -> token is one-to-one


def test_layout_without_and_with_pull_left(table):
    torch.manual_seed(0)
    inputs = torch.randint(0, 50256, (300,))
    inputs[[0, 40, 41, 200]] = tg.EOT_TOKEN
    assert torch.equal(mot_feature.token_bytes(inputs, table, False), table[inputs].long())
    pulled = mot_feature.token_bytes(inputs, table, True)
    docs = tg.document_ids(inputs)
    for t in range(len(inputs)):
        stream = []  # the document's bytes up to and including token t
        for j in range(t + 1):
            if docs[j] == docs[t]:
                stream += row_bytes(table[inputs[j]])
        want = stream[-S:]
        assert pulled[t].tolist() == [mot_feature.BYTE_PAD] * (S - len(want)) + want, t
        assert pulled[t, -len(row_bytes(table[inputs[t]])):].tolist() == row_bytes(table[inputs[t]])


def test_pull_left_never_crosses_eot(table):
    inputs = torch.tensor([tg.EOT_TOKEN, 1000, 2000, tg.EOT_TOKEN, 3000] * 8)
    pulled = mot_feature.token_bytes(inputs, table, True)
    for t in (3, 8):  # an EOT sees only its own byte, the next token only the EOT and itself
        assert row_bytes(pulled[t]) == [mot_feature.BYTE_EOT]
        assert row_bytes(pulled[t + 1]) == [mot_feature.BYTE_EOT] + row_bytes(table[3000])


@pytest.mark.parametrize("mode", ["cross", "cross+self"])
@pytest.mark.parametrize("pull_left", [False, True])
def test_mot_is_causal(mode, pull_left):
    # zero-initialized projections (the byte path's output, the head) would hide any leak
    model = smoke_model("--mot=" + mode, f"--mot_pull_left={pull_left}", "--mot_self_window=8", std=0.1).eval()
    assert_causal_and_byte_dependent(model)


@pytest.mark.parametrize("flags", ["--mot=cross --char_dim=0", "--mot=cross+self --char_dim=0 --mot_heads=2",
                                   "--mot=cross+self --mot_self_pool=2",
                                   "--mot=cross+self --mot_self_pool=4 --mot_pull_left=True"])
def test_char_dim_zero_and_self_pool_are_causal(flags):
    model = smoke_model(*flags.split(), "--mot_self_window=8", std=0.1).eval()
    with torch.no_grad():
        model.mot.mix.fill_(1.0)  # --char_dim=0 starts with b = 0, which would hide the bytes
    assert_causal_and_byte_dependent(model)


def assert_causal_and_byte_dependent(model):
    """Tokens after t never change the byte path or the logits up to t; every position's logits use its bytes."""
    inputs = torch.randint(0, 50256, (256,))
    inputs[[0, 70, 150]] = tg.EOT_TOKEN
    changed = inputs.clone()
    t = 100
    changed[t + 1:] = torch.randint(0, 50256, (len(inputs) - t - 1,))
    tok = model.embed(inputs)[None]
    with torch.no_grad():
        a, b = model.mot(tok, inputs), model.mot(model.embed(changed)[None], changed)
        la, lb = model(inputs), model(changed)
        mix = model.mot.mix.clone()
        model.mot.mix[1] = 0  # the token embedding alone: the logits without the bytes
        no_bytes = model(inputs)
        model.mot.mix.copy_(mix)
    assert not torch.equal(a, tok)  # the byte path contributes
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert torch.allclose(la[:t + 1], lb[:t + 1], atol=1e-5)
    assert not torch.allclose(la[t + 1:], lb[t + 1:], atol=1e-3)  # later logits do see the changed tokens
    assert (la - no_bytes).abs().amax(-1).min() > 1e-3  # every position's logits depend on its bytes


def test_default_is_unchanged_and_mot_params_are_owned_once():
    base = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
    assert not any(k.startswith("mot") for k in base.state_dict())
    args = mot_args("--char_dim=64", "--mot_heads=2")
    model = tg.build_model(args)
    C, D = 64, 128
    added = mot_feature.BYTE_VOCAB * C + S * C + D * C + C * 2 * C + C * D + 2
    assert tg.count_params(model) - tg.count_params(base) == added
    assert not any("byte_table" in k for k in model.state_dict())
    groups = tg.param_groups(model, args)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.mot.char_embed.weight for p in groups["embeds"])
    assert any(p is model.mot.mix for p in groups["scalars"])
    assert any(p is model.mot.q.weight for p in groups["head"])
    assert model.mot.byte_table.dtype == torch.int16
    assert model.to(torch.bfloat16).mot.byte_table.dtype == torch.int16  # module casts skip integer buffers


def test_byte_stream_masks_agree():
    inputs = torch.randint(0, 50256, (128,))
    inputs[[0, 50, 51]] = tg.EOT_TOKEN
    docs = tg.document_ids(inputs).repeat_interleave(4)  # cross+self: 512 byte positions
    dense = tg.dense_attention_mask(docs, 2, docs=docs)
    i = torch.arange(512)
    want = (i[:, None] >= i[None, :]) & (docs[:, None] == docs[None, :]) & (i[:, None] // 128 - i[None, :] // 128 < 2)
    assert torch.equal(dense, want)
    bm = tg.flex_block_mask(docs, torch.tensor(2), docs=docs)
    tiles = dense.view(4, 128, 4, 128).permute(0, 2, 1, 3).flatten(2)
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles.any(-1))


def test_byte_stream_document_ids(monkeypatch):
    """CharSelfAttention's per-byte document ids are the token's, repeated over its slots."""
    attn = mot_feature.CharSelfAttention(mot_args("--mot=cross+self", "--bytes_per_token=4"))
    inputs = torch.randint(0, 50256, (128,))
    inputs[[0, 50, 51, 127]] = tg.EOT_TOKEN
    seen = []
    dense = tg.dense_attention_mask
    monkeypatch.setattr(tg, "dense_attention_mask", lambda x, w, docs, **kw: seen.append(docs) or dense(x, w, docs))
    with torch.no_grad():
        attn(torch.randn(128, 4, attn.qkv.in_features), inputs)
    assert torch.equal(seen[0], tg.document_ids(inputs).repeat_interleave(4))


def test_check_config_names_valid_values():
    for bad, msg in (("--mot=self", "valid values: off, cross, cross\\+self"),
                     ("--char_dim=30", "multiple of --mot_heads"),
                     ("--mot=cross+self --bytes_per_token=2097152", "overflows int32"),  # 1024 x 2^21 = 2^31
                     ("--mot=cross+self --mot_self_window=0", "must be >= 1"),
                     ("--mot=cross+self --mot_self_pool=3", "must divide --bytes_per_token=16 .*; valid values: 1, "
                                                            "2, 4, 8, 16"),
                     ("--char_dim=0 --mot_heads=3", "byte width 128; 0 = model_dim\\) must be a positive multiple of "
                                                    "--mot_heads=3")):
        with pytest.raises(SystemExit, match=msg):
            tg.check_config(mot_args(*bad.split()), 1)


def test_char_dim_zero_is_model_width_without_q_and_proj():
    D = 128
    base = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
    args = mot_args("--char_dim=0")
    tg.check_config(args, 1)
    model = tg.build_model(args)
    mot = model.mot
    assert isinstance(mot.q, torch.nn.Identity) and isinstance(mot.proj, torch.nn.Identity)
    assert mot.char_embed.weight.shape == (mot_feature.BYTE_VOCAB, D) and mot.kv.weight.shape == (2 * D, D)
    assert tg.count_params(model) - tg.count_params(base) == mot_feature.BYTE_VOCAB * D + S * D + 2 * D * D + 2
    assert mot.flops_per_token(512) == 2 * S * 2 * D * D + 4 * S * D  # keys/values and the attention only
    inputs = torch.randint(0, 50256, (128,), generator=torch.Generator().manual_seed(0))
    tok = model.embed(inputs)[None]
    out = mot(tok, inputs)
    assert torch.equal(out, tok)  # b = 0 at init: step 0 is the baseline
    b_grad, kv_grad = torch.autograd.grad((out * torch.randn_like(out)).sum(), (mot.mix, mot.kv.weight))
    assert b_grad[1] != 0 and kv_grad.abs().sum() == 0  # b moves first, then the byte path trains
    self_args = mot_args("--mot=cross+self", "--char_dim=0")
    mixing = mot_feature.build_char_mixing(self_args)
    assert mixing.qkv.weight.shape == (3 * D, D)  # the self-attention keeps its matrices


def test_self_pool_one_is_todays_byte_self_attention():
    unpooled = mot_feature.build_char_mixing(mot_args("--mot=cross+self", "--mot_self_pool=1"))
    assert type(unpooled) is mot_feature.CharSelfAttention
    # the pooled module's math at K = 1 with unit order scales is today's module, bit for bit
    args = mot_args("--mot=cross+self", "--bytes_per_token=4", "--mot_self_pool=1")
    torch.manual_seed(0)
    plain = randomize_zero_matrices(mot_feature.CharSelfAttention(args))
    pooled = mot_feature.PooledCharSelfAttention(args)
    pooled.load_state_dict({**plain.state_dict(), "order": torch.ones(128)})
    inputs = torch.randint(0, 50256, (128,), generator=torch.Generator().manual_seed(0))
    inputs[[0, 60]] = tg.EOT_TOKEN
    chars = torch.randn(128, 4, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain(chars, inputs)
        assert torch.equal(pooled(chars, inputs), want) and (want - chars).abs().max() > 0.01


def test_self_pool_shortens_the_stream_and_keeps_byte_order(monkeypatch):
    args = mot_args("--mot=cross+self", "--bytes_per_token=8", "--mot_self_pool=4")
    tg.check_config(args, 1)
    torch.manual_seed(0)
    attn = randomize_zero_matrices(mot_feature.PooledCharSelfAttention(args))
    assert attn.positions_per_token == 2 and attn.order.shape == (4 * 128,)
    inputs = torch.randint(0, 50256, (128,), generator=torch.Generator().manual_seed(0))
    inputs[[0, 50, 51, 127]] = tg.EOT_TOKEN
    chars = torch.randn(128, 8, 128, generator=torch.Generator().manual_seed(1))
    seen = []
    dense = tg.dense_attention_mask
    monkeypatch.setattr(tg, "dense_attention_mask", lambda x, w, docs, **kw: seen.append(docs) or dense(x, w, docs))
    with torch.no_grad():
        branch = attn(chars, inputs) - chars
        swapped = chars.clone()
        swapped[90, [0, 1]] = chars[90, [1, 0]]  # two bytes of one group trade places
        moved = attn(swapped, inputs) - swapped
        attn.order.fill_(1.0)  # equal scales: the sum forgets the order, as an added per-slot vector would
        same = attn(swapped, inputs) - swapped, attn(chars, inputs) - chars
    assert torch.equal(seen[0], tg.document_ids(inputs).repeat_interleave(2))  # K x shorter stream, token's docs
    torch.testing.assert_close(branch[:, 0], branch[:, 3])  # a group's output goes to each of its K bytes
    assert not torch.allclose(branch[:, 3], branch[:, 4], atol=1e-4)
    assert not torch.allclose(moved[90], branch[90], atol=1e-4)  # the learned per-slot scales see the order
    torch.testing.assert_close(*same)
    torch.testing.assert_close(moved[:90], branch[:90])  # and nothing earlier sees the swap


def test_self_pool_flops_per_token():
    """Per token: S / K positions, each over a window of mot_self_window * S / K positions (to 128s): matrix FLOPs
    fall K-fold, score FLOPs about K^2-fold; describe_model adds them to the total."""
    C, seq_len, flops = 128, 512, {}
    for K in (1, 2, 4):
        args = mot_args("--mot=cross+self", f"--mot_self_pool={K}")
        tg.check_config(args, 1)
        P = S // K
        window_blocks = -(-64 * P // 128)
        context = min(seq_len * P, window_blocks * 128 - 64)
        flops[K] = mot_feature.build_char_mixing(args).flops_per_token(seq_len)
        assert flops[K] == P * (2 * 4 * C * C + 4 * context * C)
    assert flops[1] > 3 * flops[2] > 9 * flops[4]
    pooled_args = mot_args("--mot=cross+self", "--mot_self_pool=2")
    model = tg.build_model(pooled_args)
    cross = 2 * 128 * C + 2 * S * 2 * C * C + 4 * S * C + 2 * C * 128  # q, keys/values, attention, proj
    assert model.mot.flops_per_token(seq_len) == cross + flops[2]
    flops_line = tg.describe_model(model, pooled_args).splitlines()[-1]
    assert flops_line.startswith("forward FLOPs/token") and f"+ mot {(cross + flops[2]) / 1e6:.1f}M" in flops_line
    smoke = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"])
    assert "+ mot" not in tg.describe_model(tg.build_model(smoke), smoke)
    assert any("--mot_self_pool" in w for w in tg.meaningless_flags(mot_args("--mot_self_pool=2")))  # cross only


@pytest.mark.parametrize("flags", ["--mot=cross", "--mot=cross+self --mot_pull_left=True --bytes_per_token=4",
                                   pytest.param("--mot=cross+self --mot_self_pool=4 --char_dim=0 --bytes_per_token=8",
                                                marks=pytest.mark.slow)])
def test_smoke_trains_with_mot(shakespeare_shards, tmp_path, capsys, flags):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", *flags.split(), f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4"])
    out = capsys.readouterr().out
    vals = val_losses(out)
    assert code == 0
    assert vals[0] > 10.5 and vals[-1] < vals[0] - 2.5, vals
