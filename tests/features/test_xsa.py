"""features/xsa.py (--xsa_layers): each head loses tanh(alpha) of its output's value direction. Its per-token
form under the MUDD gates: tests/features/test_mudd_gates.py."""
import math

import torch

import features.xsa as xsa_feature


def test_xsa_removes_tanh_alpha_of_the_value_direction():
    xsa = xsa_feature.ExclusiveSelfAttention(heads=4, kv_heads=2)
    y, v = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16)
    v[0, 3, 1] = 0  # a zero value: no division by zero
    assert torch.equal(xsa(y, v), y)  # alpha = 0
    with torch.no_grad():
        xsa.alpha.copy_(torch.tensor([0.3, -1.0, 2.0, 50.0]))
    out = xsa(y, v)
    vq = v.repeat_interleave(2, dim=2)  # query heads 0, 1 read K/V head 0; 2, 3 read head 1
    for h in range(4):
        t = math.tanh(xsa.alpha[h].item())
        dot_in, dot_out = (y[..., h, :] * vq[..., h, :]).sum(-1), (out[..., h, :] * vq[..., h, :]).sum(-1)
        torch.testing.assert_close(dot_out, (1 - t) * dot_in, rtol=1e-4, atol=1e-4)
        # only the value direction changes: the part orthogonal to v is y's own
        perp = lambda z: z - (z * vq[..., h, :]).sum(-1, keepdim=True) / (vq[..., h, :] ** 2).sum(
            -1, keepdim=True).clamp_min(1e-8) * vq[..., h, :]
        torch.testing.assert_close(perp(out[..., h, :]), perp(y[..., h, :]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0, 3, 2:], y[0, 3, 2:])  # zero value vector: y unchanged
    assert (out[..., 3, :] * vq[..., 3, :]).sum(-1).abs().max() < 1e-3  # tanh(50) = 1: orthogonal to v
