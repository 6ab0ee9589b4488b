"""--mot: the GPT-2 byte table, the bytes each position sees (with and without --mot_pull_left), causality of
CharCrossAttention, optimizer routing, the default model unchanged, and the smoke preset training with it."""
import pytest
import torch

import train_gpt as tg
from conftest import smoke_model, val_losses

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
    return tg.byte_table(S)


def row_bytes(row) -> list[int]:
    return [int(b) for b in row if b != tg.BYTE_PAD]


def mot_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--mot=cross", *extra])


def test_table_is_integer_with_exact_right_aligned_bytes(enc, table):
    assert table.dtype in (torch.int16, torch.int32) and table.shape == (tg.GPT2_VOCAB, S)
    assert table.min() >= 0 and table.max() <= tg.BYTE_EOT
    samples = [enc.encode(" hello")[0], enc.encode("!")[0], 0, 255, 50255]
    samples += [t for t in range(50256) if len(enc.decode_single_token_bytes(t)) > 1
                and any(b >= 0x80 for b in enc.decode_single_token_bytes(t))][:5]  # multi-byte UTF-8 pieces
    for t in samples:
        piece = list(enc.decode_single_token_bytes(t))
        assert table[t].tolist() == [tg.BYTE_PAD] * (S - len(piece)) + piece, t
    assert table[tg.EOT_TOKEN].tolist() == [tg.BYTE_PAD] * (S - 1) + [tg.BYTE_EOT]


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
            real = tuple(b for b in row if b != tg.BYTE_PAD)
            assert bytes(real) == piece, t
            assert lookup.setdefault(real, t) == t  # bytes -> token is one-to-one


def test_layout_without_and_with_pull_left(table):
    torch.manual_seed(0)
    inputs = torch.randint(0, 50256, (300,))
    inputs[[0, 40, 41, 200]] = tg.EOT_TOKEN
    assert torch.equal(tg.token_bytes(inputs, table, False), table[inputs].long())
    pulled = tg.token_bytes(inputs, table, True)
    docs = tg.document_ids(inputs)
    for t in range(len(inputs)):
        stream = []  # the document's bytes up to and including token t
        for j in range(t + 1):
            if docs[j] == docs[t]:
                stream += row_bytes(table[inputs[j]])
        want = stream[-S:]
        assert pulled[t].tolist() == [tg.BYTE_PAD] * (S - len(want)) + want, t
        assert pulled[t, -len(row_bytes(table[inputs[t]])):].tolist() == row_bytes(table[inputs[t]])


def test_pull_left_never_crosses_eot(table):
    inputs = torch.tensor([tg.EOT_TOKEN, 1000, 2000, tg.EOT_TOKEN, 3000] * 8)
    pulled = tg.token_bytes(inputs, table, True)
    for t in (3, 8):  # an EOT sees only its own byte, the next token only the EOT and itself
        assert row_bytes(pulled[t]) == [tg.BYTE_EOT]
        assert row_bytes(pulled[t + 1]) == [tg.BYTE_EOT] + row_bytes(table[3000])


@pytest.mark.parametrize("mode", ["cross", "cross+self"])
@pytest.mark.parametrize("pull_left", [False, True])
def test_mot_is_causal(mode, pull_left):
    # zero-initialized projections (the byte path's output, the head) would hide any leak
    model = smoke_model("--mot=" + mode, f"--mot_pull_left={pull_left}", "--mot_self_window=8", std=0.1).eval()
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
    added = tg.BYTE_VOCAB * C + S * C + D * C + C * 2 * C + C * D + 2
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
    attn = tg.CharSelfAttention(mot_args("--mot=cross+self", "--bytes_per_token=4"))
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
                     ("--mot=cross+self --mot_self_window=0", "must be >= 1")):
        with pytest.raises(SystemExit, match=msg):
            tg.check_config(mot_args(*bad.split()), 1)


@pytest.mark.parametrize("flags", ["--mot=cross", "--mot=cross+self --mot_pull_left=True --bytes_per_token=4"])
def test_smoke_trains_with_mot(shakespeare_shards, tmp_path, capsys, flags):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", *flags.split(), f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4"])
    out = capsys.readouterr().out
    vals = val_losses(out)
    assert code == 0
    assert vals[0] > 10.5 and vals[-1] < vals[0] - 2.5, vals
