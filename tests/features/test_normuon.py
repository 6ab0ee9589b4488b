"""NorMuon (--normuon_beta2, features/normuon.py; frontier recipe 2.1): the statistics and the rescale by hand, per
row or column, and an all-zero update. Per head pair: tests/features/test_muon_qk_pairs.py."""
import math

import torch

import features.normuon as normuon_feature

def test_normuon_statistics_by_hand():
    X = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]])  # wide: one statistic per column
    state = {}
    Y = normuon_feature.NorMuon(0.9)(X[None], [state])[0]
    v = torch.tensor([[0.1 * 5.0, 0.1 * 2.0, 0.1 * 8.0]])  # column means of squares 5, 2, 8; 0.1 of them (zero init)
    assert torch.allclose(state["normuon_v"], v)
    raw = X / v.sqrt()
    assert torch.allclose(Y, raw * math.sqrt(30.0) / raw.norm())
    tall = normuon_feature.NorMuon(0.9)(X.T[None], [{}])[0]  # tall: one statistic per row, the same numbers, transposed
    assert torch.allclose(tall, Y.T)
    assert torch.equal(normuon_feature.NorMuon(0.9)(torch.zeros(1, 2, 3), [{}]), torch.zeros(1, 2, 3))  # no 0/0


def test_state_shapes_per_piece_of_a_split_parameter():
    """One v per row (tall) or column (wide) of every matrix of each piece, keyed per piece; Muon's state_shapes
    adds them to the momentum's."""
    qkv = torch.empty(1, 3, 64, 64, device="meta")  # a stacked qkv update, Q and K cut into pairs (2, 32 rows)
    pieces = [qkv[:, :2].unflatten(-2, (-1, 32)), qkv[:, 2:]]
    # each (32, 64) pair slice is wide: one value per column; V (64, 64) counts as tall: one per row
    assert normuon_feature.NorMuon.state_shapes(pieces) == {"normuon_v": (2, 2, 1, 64), "normuon_v1": (1, 64, 1)}
