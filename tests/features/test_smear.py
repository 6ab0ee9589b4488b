"""features/smear.py (--smear): the smear by hand, and a fresh one leaves the embeddings alone. Its causality,
document crossing and KV-cache refusal with the other frontier flags: tests/core/test_frontier_model.py."""
import math

import torch

import features.smear as smear_feature


def test_smear_by_hand():
    smear = smear_feature.Smear()
    with torch.no_grad():
        smear.gate.copy_(torch.linspace(-1, 1, 12))
        smear.lam.fill_(0.7)
    e = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    expected = e.clone()
    for t in range(1, 5):
        g = 1 / (1 + math.exp(-sum(smear.gate[i].item() * e[0, t, i].item() for i in range(12))))
        expected[0, t] = e[0, t] + 0.7 * g * e[0, t - 1]  # the raw e_(t-1), not its smeared value
    torch.testing.assert_close(smear(e), expected)
    fresh = smear_feature.Smear()
    assert torch.equal(fresh(e), e) and fresh.gate.shape == (12,) and fresh.lam.shape == (1,)
