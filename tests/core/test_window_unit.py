"""--window_unit=token (issue 20 item 1): FA3's window_size=(128 W, 0) rule, query i sees key j of its document iff
0 <= i - j <= 128 W (W halved for the short window of #21-style runs; doubled positions for paired heads). The dense
mask against a loop over the rule; keys per query (129 vs block mode's 1..128); the BlockMask against the dense
mask, plain and doubled, and compiled FlexAttention on it against SDPA; KV-cache and batched decoding against the
full forward; describe_model's key counts; the default (block) masks untouched; the flag check; pinned digests of
the token masks for a fixed sequence (token_mask_digests) that a fidelity test can compare with the record's rule."""
import hashlib

import pytest
import torch

import features.paired_heads as paired_heads
import train_gpt as tg
from conftest import (block_mask_as_dense, cached_logits, live_model, load_script, preflight_flex_problems, smoke_args,
                      tokens_with_docs)

BLOCK = tg.BLOCK_SIZE


def window(blocks: int) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.int32)


def rule_by_hand(docs: list[int], window_blocks: int, halvings: int = 0) -> torch.Tensor:
    """The record's rule, one (query, key) pair at a time: same document and 0 <= i - j <= 128 max(W >> h, 1)."""
    reach = BLOCK * max(window_blocks >> halvings, 1)
    T = len(docs)
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(max(0, i - reach), i + 1):
            out[i, j] = docs[i] == docs[j]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The dense mask


@pytest.mark.parametrize("window_blocks", [1, 3, 13])
def test_dense_token_mask_equals_the_rule_by_hand(window_blocks):
    """Documents from tokens 0, 57, 300, 301 (a one-token document), 700: windows cut them mid-block."""
    x = tokens_with_docs(1024, [0, 57, 300, 301, 700])
    docs = tg.document_ids(x).tolist()
    for halvings in (0, 1):
        dense = tg.dense_attention_mask(x, window(window_blocks), halvings=halvings, unit="token")
        assert torch.equal(dense, rule_by_hand(docs, window_blocks, halvings)), halvings
    # a plain int window (CharSelfAttention-style callers) gives the same mask
    assert torch.equal(tg.dense_attention_mask(x, window_blocks, unit="token"),
                       tg.dense_attention_mask(x, window(window_blocks), unit="token"))


def test_keys_per_query_at_window_1():
    """Inside one long document, at W = 1: every query past the first 128 tokens sees 129 keys (itself and the 128
    before it); block mode sees 1..128 keys (its own block up to itself), 64.5 on average."""
    x = torch.full((1024,), 11)
    x[0] = tg.EOT_TOKEN
    token = tg.dense_attention_mask(x, window(1), unit="token").sum(1)[BLOCK:]
    block = tg.dense_attention_mask(x, window(1)).sum(1)[BLOCK:]
    assert token.unique().tolist() == [129]
    assert block.min() == 1 and block.max() == 128 and block.float().mean().item() == 64.5
    # the short window of a #21-style run halves W in blocks: W = 3 -> 1 block -> 129 keys; W = 7 -> 3 -> 385
    assert tg.dense_attention_mask(x, window(3), halvings=1, unit="token").sum(1)[BLOCK:].unique().tolist() == [129]
    assert tg.dense_attention_mask(x, window(7), halvings=1, unit="token").sum(1)[3 * BLOCK:].unique().tolist() == [
        385]


def test_default_block_masks_are_unchanged():
    """unit="block" (the default) is #21's rule: j's 128-block is among the last max(W >> h, 1) up to i's."""
    x = tokens_with_docs(512, [0, 57, 300, 301])
    docs = tg.document_ids(x)
    i = torch.arange(512)
    for w, h in ((1, 0), (3, 0), (3, 1), (5, 1)):
        by_rule = ((i[:, None] >= i[None, :]) & (docs[:, None] == docs[None, :])
                   & (i[:, None] // BLOCK - i[None, :] // BLOCK < max(w >> h, 1)))
        assert torch.equal(tg.dense_attention_mask(x, window(w), halvings=h), by_rule)
        assert torch.equal(block_mask_as_dense(tg.flex_block_mask(x, window(w), halvings=h)), by_rule)
    model = tg.build_model(smoke_args())
    assert model.window_unit == "block"
    masks = model.attention_masks(x, window(3))
    assert torch.equal(masks["L"], tg.dense_attention_mask(x, window(3)))
    assert torch.equal(masks["S"], tg.dense_attention_mask(x, window(1)))


# ---------------------------------------------------------------------------------------------------------------
# The BlockMask (GPU path)


def block_lists(bm) -> tuple[list, list]:
    n = bm.kv_num_blocks.shape[-1]
    partial = [sorted(bm.kv_indices[0, 0, q, :int(bm.kv_num_blocks[0, 0, q])].tolist()) for q in range(n)]
    full = [sorted(bm.full_kv_indices[0, 0, q, :int(bm.full_kv_num_blocks[0, 0, q])].tolist()) for q in range(n)]
    return partial, full


def test_block_mask_equals_the_dense_mask_plain_and_doubled():
    x = tokens_with_docs(768, [0, 57, 300, 301, 640])
    doubled = paired_heads.paired_document_ids(x)
    for w in (1, 2, 3, 13):
        for h in (0, 1):
            dense = tg.dense_attention_mask(x, window(w), halvings=h, unit="token")
            assert torch.equal(block_mask_as_dense(tg.flex_block_mask(x, window(w), halvings=h, unit="token")), dense)
            dense = tg.dense_attention_mask(x, window(w), docs=doubled, halvings=h, unit="token")
            bm = tg.flex_block_mask(x, window(w), docs=doubled, halvings=h, unit="token")
            assert torch.equal(block_mask_as_dense(bm), dense), (w, h)
            # the doubled rule by hand: positions p, p' in the documents of tokens p // 2, p' // 2
            assert torch.equal(dense, rule_by_hand(doubled.tolist(), w, h)), (w, h)


def test_block_mask_structure():
    """One document of 768 tokens, W = 2: query block q reads blocks q-1 (inside the window: full) and q (causal:
    partial) as block mode does, plus block q-2, which the 256-token window cuts (partial); nothing farther."""
    x = torch.full((768,), 11)
    x[0] = tg.EOT_TOKEN
    partial, full = block_lists(tg.flex_block_mask(x, window(2), unit="token"))
    assert partial == [[0], [1], [0, 2], [1, 3], [2, 4], [3, 5]]
    assert full == [[], [0], [1], [2], [3], [4]]
    assert block_lists(tg.flex_block_mask(x, window(2))) == ([[0], [1], [2], [3], [4], [5]],
                                                             [[], [0], [1], [2], [3], [4]])


def test_compiled_flex_attention_on_the_token_block_mask_equals_sdpa():
    """The GPU path's kernel on CPU: compiled FlexAttention (which honors the block lists) with the token BlockMask
    against SDPA on the dense mask, plain and on the doubled sequence, windows 1 and 3 through one compiled graph."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 32, generator=g) for _ in range(3))  # one shape: one compile
    torch._dynamo.reset()
    compiled = torch.compile(tg.flex_attention, dynamic=False)
    for x, docs in ((tokens_with_docs(1024, [0, 70, 200, 201, 390, 800]), None),
                    (tokens_with_docs(512, [0, 70, 200, 201, 390]), "doubled")):
        docs = paired_heads.paired_document_ids(x) if docs else None
        for w in (1, 3):
            bm = tg.flex_block_mask(x, window(w), docs=docs, unit="token")
            dense = tg.dense_attention_mask(x, window(w), docs=docs, unit="token")
            torch.testing.assert_close(compiled(q, k, v, block_mask=bm, scale=0.2), tg.attend(q, k, v, dense, 0.2),
                                       rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_token_model_with_block_masks_equals_eager_dense(monkeypatch):
    """The whole model's GPU path on CPU with --window_unit=token and paired heads: torch.compile with
    FLEX_ATTENTION_ON_CPU against the eager dense-mask model, two windows, one graph (inductor compile: --slow)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model = live_model("--window_unit=token", "--num_heads=4", "--paired_head_layers=0").eval()
    x = tokens_with_docs(512, [0, 70, 200, 201, 390])
    with torch.no_grad():
        refs = [model(x, None, window(w)) for w in (1, 3)]
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
        outs = [compiled(x, None, window(w)) for w in (1, 3)]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# The model: its masks, decoding, FLOPs


def test_model_builds_token_masks_plain_and_paired(monkeypatch):
    model = tg.build_model(smoke_args("--window_unit=token", "--num_heads=4", "--paired_head_layers=0,1"))
    x = tokens_with_docs(256, [0, 40, 200])
    doubled = paired_heads.paired_document_ids(x)
    masks = model.attention_masks(x, window(3))  # #21-style: short = 3 >> 1 = 1 block = 128 tokens
    assert torch.equal(masks["L"], tg.dense_attention_mask(x, window(3), unit="token"))
    assert torch.equal(masks["S"], tg.dense_attention_mask(x, window(1), unit="token"))
    assert torch.equal(masks["paired_L"], rule_by_hand(doubled.tolist(), 3))
    assert torch.equal(masks["paired_S"], rule_by_hand(doubled.tolist(), 1))
    monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
    blocks = model.attention_masks(x, (window(3), window(2)))  # --stages: (long, short)
    for kind, mask in (("L", masks["L"]), ("S", tg.dense_attention_mask(x, window(2), unit="token")),
                       ("paired_L", masks["paired_L"]), ("paired_S", rule_by_hand(doubled.tolist(), 2))):
        assert torch.equal(block_mask_as_dense(blocks[kind]), mask), kind


def test_token_window_changes_the_model():
    """The same weights under the two rules differ where a window cuts a document (W = 1 at 300 tokens)."""
    x = tokens_with_docs(384, [0, 250])
    token = live_model("--window_unit=token").eval()
    block = live_model().eval()
    with torch.no_grad():
        a, b = token(x, None, window(1)), block(x, None, window(1))
    assert torch.equal(a[:BLOCK], b[:BLOCK])  # the first block: both rules see every earlier key
    assert not torch.allclose(a, b)


def test_kv_cache_decoding_equals_the_full_forward():
    """A 250-token document cut by the 129-key window (W = 1) and the 128-token short one (W >> 1 -> 1 block)."""
    model = live_model("--window_unit=token").eval()
    x = tokens_with_docs(280, [0, 20, 270])
    with torch.no_grad():
        full = model(torch.cat([x, torch.zeros(104, dtype=x.dtype)]), window_blocks=1)[:280]
    torch.testing.assert_close(cached_logits(model, x, 1), full, rtol=1e-4, atol=1e-4)


def test_batched_decoding_equals_each_prompt_alone():
    """tools/sample.py's BatchKVCache applies the model's unit: a 140-token prompt is cut by the 129-key window."""
    sample = load_script("tools/sample.py")
    model = live_model("--window_unit=token").eval()
    prompts = [[tg.EOT_TOKEN, 464, 3290, 318], [tg.EOT_TOKEN, 40, 588, 11, tg.EOT_TOKEN, 1212, 318],
               [tg.EOT_TOKEN] + list(range(1000, 1139))]
    alone = [sample.generate(model, p, 6, window_blocks=1, stop_at_eot=False) for p in prompts]
    assert sample.generate_batch(model, prompts, 6, window_blocks=1, stop_at_eot=False) == alone
    seq = list(prompts[2])  # and greedy decoding equals the argmax of full forwards
    with torch.no_grad():
        for _ in range(6):
            padded = torch.tensor(seq + [0] * (-len(seq) % BLOCK))
            seq.append(int(model(padded, window_blocks=1)[len(seq) - 1][:model.vocab_size].argmax()))
    assert alone[2] == seq[len(prompts[2]):]


def test_describe_model_counts_128w_plus_1_keys():
    """Smoke: final window 3 blocks (short 1). Block mode counts 3 x 128 - 64 = 320 / 64 keys, token mode
    3 x 128 + 1 = 385 / 129; both capped at the sequence (512 tokens)."""
    text = lambda *f: tg.describe_model(tg.build_model(smoke_args(*f)), smoke_args(*f))
    assert "at windows 320/64" in text() and "at windows 385/129" in text("--window_unit=token")
    assert "at windows 512/257" in text("--window_unit=token", "--window_schedule_tokens=640")  # 5 (capped) / 2


# ---------------------------------------------------------------------------------------------------------------
# The flag


def test_the_flag_check_and_the_presets():
    with pytest.raises(SystemExit, match="--window_unit='tokens'; valid values: block, token"):
        smoke_args("--window_unit=tokens")
    assert tg.Hyperparameters().window_unit == "block"
    assert tg.PRESETS["frontier"]["window_unit"] == "token"
    assert tg.PRESETS["frontier_smoke"]["window_unit"] == "token"
    assert "--window_unit" in tg.flag_help()


# ---------------------------------------------------------------------------------------------------------------
# Pinned digests: the token masks of a fixed sequence, for a fidelity test against the record's rule

# document starts of the fixed 1024-token sequence: the last document (774 tokens, 1548 doubled positions) is cut by
# every window but the plain long one of 11 blocks (1408 tokens)
DIGEST_EOTS = (0, 57, 190, 191, 250)


def digest_tokens() -> torch.Tensor:
    """T = 1024 token ids drawn with seed 1234, EOT at DIGEST_EOTS."""
    x = torch.randint(0, 50000, (1024,), generator=torch.Generator().manual_seed(1234))
    x[list(DIGEST_EOTS)] = tg.EOT_TOKEN
    return x


def mask_digest(mask: torch.Tensor) -> str:
    """SHA-256 of a boolean (N, N) mask as N * N row-major bytes of 0/1."""
    return hashlib.sha256(mask.to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def token_mask_digests() -> dict:
    """(plain | paired, short, long) -> {"L", "S"} -> (allowed pairs, SHA-256) of the dense token masks of
    digest_tokens() at --stages windows (short, long) = (1, 3) and (5, 11); paired: the (2048, 2048) doubled
    masks. A fidelity test can rebuild the masks from the record's rule and compare."""
    x = digest_tokens()
    out = {}
    for kind, docs in (("plain", None), ("paired", paired_heads.paired_document_ids(x))):
        for short, long in ((1, 3), (5, 11)):
            masks = {k: tg.dense_attention_mask(x, window(w), docs=docs, unit="token")
                     for k, w in (("L", long), ("S", short))}
            out[kind, short, long] = {k: (int(m.sum()), mask_digest(m)) for k, m in masks.items()}
    return out


PINNED_TOKEN_MASK_DIGESTS = {
    ("plain", 1, 3): {"L": (236405, "5ec07a7e5dc2cdc87ab6737316c66dff071b4ff162627317e68ad6b8867f38e7"),
                      "S": (103915, "3eeb812871ff38249395fdfef1869dd72ec8b9d48a9c304bb47ce8e092c95fee")},
    ("plain", 5, 11): {"L": (312260, "5303a8f6391aad8c32103bca66a418df9a13802c1461dd896f0f7f3e11356b98"),
                       "S": (303349, "cb3c114923dc3f61efa8a3455172a9c34b62c847866ac5a1dad36a3b98e3e338")},
    ("paired", 1, 3): {"L": (571150, "85dde78065a2863d2429c21a802999e85fcf026ced8a0bc68449074cd3285748"),
                       "S": (231073, "b715593f90e29a7149e4e8a1441fec4e58b9f20f792440023cc33f6519d211ea")},
    ("paired", 5, 11): {"L": (1238286, "8ca215bfe9ebb5ccaa416ae854028ed8beeec59ce23c9ae6fcaec7e321a2b1cc"),
                        "S": (836238, "cf37c11fb02d788749e5663037dfad17f8966ab11d810590ec028523c17276f7")},
}


def test_token_mask_digests_are_pinned():
    assert token_mask_digests() == PINNED_TOKEN_MASK_DIGESTS
    # the pins are the record's rule, written without train_gpt: document of position p = that of token p // 2
    # (paired), a key visible iff same document and 0 <= p - p' <= 128 W
    starts = torch.zeros(1024, dtype=torch.long)
    starts[list(DIGEST_EOTS)] = 1
    for kind, per_token in (("plain", 1), ("paired", 2)):
        docs = starts.cumsum(0).repeat_interleave(per_token)
        p = torch.arange(len(docs))
        for (k, short, long), pins in PINNED_TOKEN_MASK_DIGESTS.items():
            if k == kind:
                for w, which in ((long, "L"), (short, "S")):
                    d = p[:, None] - p[None, :]
                    mask = (docs[:, None] == docs[None, :]) & (d >= 0) & (d <= BLOCK * w)
                    assert (int(mask.sum()), mask_digest(mask)) == pins[which], (kind, short, long, which)


def test_preflight_checks_flex_attention_in_the_run_s_unit():
    """tools/preflight.py's flex_attention cases follow --window_unit: a token case passes with the script's mask,
    and fails when the BlockMask misses the block that the token window cuts (the one block mode never reads)."""
    from torch.nn.attention.flex_attention import BlockMask
    pf = load_script("tools/preflight.py")
    cases = pf.attention_cases(smoke_args("--window_unit=token"), quick=True)
    assert [c.unit for c in cases] == ["token"] * (len(cases) - 1) + ["block"]  # the byte stream stays in blocks

    def block_unit_lists(tokens, window, halvings=0, unit="block"):  # block mode's block lists, the token mask_mod
        bm = tg.flex_block_mask(tokens, window, halvings=halvings)
        return BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                        BLOCK_SIZE=BLOCK, mask_mod=tg.doc_causal_window_mask(
                                            tg.document_ids(tokens), window, halvings, unit))
    case = pf.AttnCase("MHA token", 2, 2, 32, 32, window=3, unit="token")
    results = preflight_flex_problems(pf, case, pf.packed_documents(1024), {"script": None, "broken": block_unit_lists})
    assert results["script"] == [] and results["broken"]
