"""features/bigram.py (--bigram_rows): the hash and sign indices by hand, fixed signs and a start at x0, the table
an Adam embedding (the value embeddings' group) counted in describe_model. Its causality, document crossing and
KV-cache refusal with the other frontier flags: tests/core/test_frontier_model.py."""
import pytest
import torch

import features.bigram as bigram_feature
import features.truncated_init as truncated_init
import train_gpt as tg
from conftest import smoke_args


def test_bigram_hash_and_sign_indices_by_hand():
    x = torch.tensor([tg.EOT_TOKEN, 464, 3290, 50256, 0, 50303], dtype=torch.int32)
    rows = 377_280
    pairs = list(zip(x.tolist(), x.tolist()[1:]))
    h = [rows - 1] + [((36313 * cur) ^ (27191 * prev)) % (rows - 1) for prev, cur in pairs]
    j = [0] + [(prev ^ cur) % 8192 for prev, cur in pairs]
    assert bigram_feature.bigram_hash(x, rows).tolist() == h
    assert bigram_feature.bigram_sign_index(x).tolist() == j
    # the first pair by hand: 36313 * 464 = 16,849,232 and 27191 * 50256 = 1,366,510,896
    assert h[1] == (16_849_232 ^ 1_366_510_896) % 377_279 and j[1] == (50256 ^ 464) % 8192
    # the recipe's int32 arithmetic never overflows for GPT-2 ids, so int64 gives its values
    assert 36313 * 50303 < 2 ** 31 and 27191 * 50303 < 2 ** 31
    assert all(0 <= v < rows for v in bigram_feature.bigram_hash(torch.randint(0, 50304, (4096,)), rows).tolist())


def test_bigram_signs_are_fixed_and_the_embedding_starts_at_x0():
    torch.manual_seed(0)
    a = bigram_feature.BigramHashEmbedding(100, 16)
    torch.manual_seed(1)  # every rank draws the same signs whatever its global RNG state: no broadcast needed
    b = bigram_feature.BigramHashEmbedding(100, 16)
    assert torch.equal(a.signs, b.signs) and a.signs.dtype == torch.int8 and a.signs.shape == (8192, 16)
    assert set(a.signs.unique().tolist()) == {-1, 1} and abs(a.signs.float().mean().item()) < 0.02
    assert "signs" in a.state_dict()  # a checkpoint pairs the table with its signs
    assert not a.table.weight.any() and a.inject.lam.item() == pytest.approx(0.05)
    x0, x = torch.randn(1, 6, 16), torch.tensor([5, 7, 9, 7, 5, 1])
    assert torch.equal(a(x0, x), x0)  # zero table: the model starts without it
    with torch.no_grad():
        a.table.weight.normal_()
        a.inject.lam.fill_(0.3)
    h, j = bigram_feature.bigram_hash(x, 100), bigram_feature.bigram_sign_index(x)
    expected = x0.clone()
    for t in range(6):
        expected[0, t] += 0.3 * a.table.weight[h[t]] * a.signs[j[t]].float()
    torch.testing.assert_close(a(x0, x), expected)


def test_bigram_table_is_an_adam_embedding_and_counted():
    args = smoke_args("--bigram_rows=4096")
    model = tg.build_model(args)
    table = model.bigram.table.weight
    groups = {g["name"]: g for g in tg.adam_param_groups(model, args)}
    # trained like the value embeddings (recipe 2.2: lr 0.6, betas 0.75/0.95, wd x5 in the frontier preset)
    assert any(p is table for p in groups["value_embeds"]["params"])
    assert groups["value_embeds"]["lr"] == (args.value_embed_lr or args.embed_lr)
    assert any(p is model.bigram.inject.lam for p in groups["scalars"]["params"])
    assert "bigram hash 524,289" in tg.describe_model(model, args)  # 4096 x 128 + the gain
    assert all(p is not table for p in truncated_init.recipe_matrices(model))  # --weight_init=truncated: left at zero
