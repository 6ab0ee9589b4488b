"""Muon on Q and K per head pair (--muon_qk_pairs, features/muon_qk_pairs.py; frontier recipe 2.1 item 7, r80):
per-pair orthogonalization against a loop over the slices, the groups and optimizer state shapes of every
attention."""
import pytest
import torch

import features.muon_qk_pairs as muon_qk_pairs
import features.normuon as normuon_feature
import train_gpt as tg
from conftest import smoke_args

def qkv_update(seed: int = 0, heads: int = 4, dim: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, dim, dim, generator=g), dim // heads  # two stacked qkv updates (one group's k = 2)


@pytest.mark.parametrize("ns", ["quintic", "polar_express"])
def test_per_pair_orthogonalization_equals_a_loop_over_the_slices(ns):
    """muon_pieces with split (2, 2 head_dim): each pair's rows of Q and of K orthogonalized alone, V whole;
    through Muon.step (bf16 update, lr) and through NorMuon (each slice its own v), bit for bit."""
    ortho = tg.feature_table("ORTHOGONALIZERS", tg.ORTHOGONALIZERS)[ns]
    U, hd = qkv_update()
    split = (2, 2 * hd)
    pieces = tg.muon_pieces(U, split)
    assert [p.shape for p in pieces] == [(2, 2, 2, 32, 64), (2, 1, 64, 64)]
    assert all(p.data_ptr() >= U.data_ptr() for p in pieces)  # views
    batched = torch.zeros_like(U)
    for u, out in zip(pieces, tg.muon_pieces(batched, split)):
        out.copy_(ortho(u, 5))
    loop = torch.zeros_like(U)
    for k in range(2):
        for m in range(2):
            for j in range(2):
                rows = slice(2 * hd * j, 2 * hd * (j + 1))
                loop[k, m, rows] = ortho(U[k, m, rows].clone(), 5)
        loop[k, 2] = ortho(U[k, 2].clone(), 5)
    assert torch.equal(batched, loop)
    whole = ortho(U, 5)
    assert not torch.allclose(whole[:, :2], loop[:, :2], atol=1e-2) and torch.equal(whole[:, 2], loop[:, 2])

    # Muon.step: one parameter of each of two stacked qkv weights, momentum 0 (update = gradient)
    params = [torch.nn.Parameter(torch.zeros(3, 64, 64)) for _ in range(2)]
    for p, u in zip(params, U):
        p.grad = u.clone()
    opt = tg.Muon(params, lr=0.1, momentum=0.0, splits={p: split for p in params})
    opt.orthogonalize = ortho
    opt.step()
    assert [g["split"] for g in opt.param_groups] == [split]
    for p, expected in zip(params, loop):
        assert torch.equal(p.detach(), -0.1 * expected.bfloat16().float())

    # NorMuon per piece: the loop normalizes each slice with its own state
    normuon = normuon_feature.NorMuon(0.9)
    states = [{}, {}]
    got = torch.zeros_like(U)
    for i, (u, out) in enumerate(zip(pieces, tg.muon_pieces(got, split))):
        out.copy_(normuon(ortho(u, 5), states, i))
    want = torch.zeros_like(U)
    for k in range(2):
        for m in range(2):
            for j in range(2):
                rows = slice(2 * hd * j, 2 * hd * (j + 1))
                want[k, m, rows] = normuon_feature.NorMuon(0.9)(ortho(U[k, m, rows].clone(), 5)[None], [{}])[0]
        want[k, 2] = normuon_feature.NorMuon(0.9)(ortho(U[k, 2].clone(), 5)[None], [{}])[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert states[0]["normuon_v"].shape == (2, 2, 1, 64) and states[0]["normuon_v1"].shape == (1, 64, 1)


def test_muon_qk_pairs_groups_q_and_k_of_every_attention_and_state_shapes_match():
    args = smoke_args("--num_heads=4", "--muon_qk_pairs=true", "--normuon_beta2=0.9", "--paired_head_layers=0")
    model = tg.build_model(args)
    muon = tg.build_optimizers(model, args)[1]
    qkv = [b.attn.qkv_w for b in model.blocks if b.attn is not None]
    split_groups = [g for g in muon.param_groups if g["split"]]
    assert len(split_groups) == 1 and split_groups[0]["split"] == (2, 64)
    assert sorted(map(id, split_groups[0]["params"])) == sorted(map(id, qkv))  # every layer, paired or not
    assert all(g["split"] == () for g in muon.param_groups if g is not split_groups[0])
    g = torch.Generator().manual_seed(0)
    for group in muon.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
    muon.step()
    for group in muon.param_groups:
        for p in group["params"]:
            state = {k: tuple(v.shape) for k, v in muon.state[p].items()}
            assert state == muon.state_shapes(p, group["split"])
    assert muon.state_shapes(qkv[0], (2, 64)) == {"momentum_buffer": (3, 128, 128), "normuon_v": (2, 2, 1, 128),
                                                  "normuon_v1": (1, 128, 1)}
    # whole stacked matrices keep one v per matrix too (what gather_momentum allocates on several ranks)
    assert muon.state_shapes(qkv[0]) == {"momentum_buffer": (3, 128, 128), "normuon_v": (3, 128, 1)}
    gqa = tg.build_model(smoke_args("--num_heads=4", "--n_kv_heads=2", "--muon_qk_pairs=true"))
    splits = muon_qk_pairs.qk_pair_splits(gqa.blocks)
    attn = gqa.blocks[0].attn
    assert splits[attn.q_w] == (1, 64) and splits[attn.kv_w] == (1, 64) and len(splits) == 6
    assert [p.shape for p in tg.muon_pieces(attn.kv_w.detach()[None], (1, 64))] == [(1, 1, 1, 64, 128),
                                                                                   (1, 1, 64, 128)]
