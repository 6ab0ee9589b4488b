"""features/polar_express.py (--muon_ns=polar_express): the iterations on a diagonal matrix by hand. Muon with it
on the frontier preset: tests/core/test_frontier.py; per head pair: tests/features/test_muon_qk_pairs.py."""
import math

import torch

import features.polar_express as polar_express_feature


def test_polar_express_on_a_diagonal_matrix():
    """On diag(s) every iteration maps each singular value s -> a s + b s^3 + c s^5 after the 1.02 normalization."""
    G = torch.diag(torch.tensor([2.0, 1.0, 0.25]))
    out = polar_express_feature.zeropower_polar_express(G, 5)
    values = [2.0 / (1.02 * math.sqrt(4 + 1 + 0.0625) + 1e-6), 1.0 / (1.02 * math.sqrt(5.0625) + 1e-6),
              0.25 / (1.02 * math.sqrt(5.0625) + 1e-6)]
    for a, b, c in polar_express_feature.POLAR_EXPRESS_COEFFICIENTS:
        values = [a * s + b * s ** 3 + c * s ** 5 for s in values]
    assert torch.allclose(torch.diagonal(out), torch.tensor(values), atol=1e-5)
    assert (out - torch.diag(torch.diagonal(out))).abs().max() < 1e-6
    assert all(0.7 < v < 1.2 for v in values)  # orthogonalized: singular values near 1
