"""Muon: Newton-Schulz orthogonalization quality, batching, and the optimizer step against a hand-written one."""
import math

import torch

import train_gpt as tg


def test_newton_schulz_singular_values_in_band():
    torch.manual_seed(0)
    for shape in [(64, 128), (128, 64), (96, 384), (2, 48, 160)]:
        X = tg.zeropower_via_newtonschulz5(torch.randn(*shape), steps=5)
        assert X.shape == shape
        s = torch.linalg.svdvals(X.float())
        # quintic coefficients converge to a band around 1, not to exactly 1
        assert s.min() > 0.65 and s.max() < 1.25, (shape, s.min(), s.max())
    # a badly conditioned matrix: its large directions still land in the band, none overshoot
    G = torch.randn(64, 128)
    G[:, :4] *= 1000
    s = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, steps=5).float())
    assert s.max() < 1.25 and s[:4].min() > 0.65


def test_batched_equals_one_by_one():
    torch.manual_seed(1)
    G = torch.randn(5, 3, 32, 80)
    batched = tg.zeropower_via_newtonschulz5(G, steps=5)
    single = torch.stack([torch.stack([tg.zeropower_via_newtonschulz5(g, steps=5) for g in gs]) for gs in G])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_muon_step_matches_the_formula():
    torch.manual_seed(2)
    shapes = [(48, 16), (48, 16), (16, 48), (3, 16, 16)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    opt = tg.Muon(params, lr=0.1, momentum=0.9, ns_steps=5)
    assert sorted(len(g["params"]) for g in opt.param_groups) == [1, 1, 2]  # one group (one batch) per shape
    bufs = [torch.zeros_like(r) for r in ref]
    for _ in range(3):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = bufs[i] * 0.9 + g * 0.1
            update = tg.zeropower_via_newtonschulz5(g * 0.1 + bufs[i] * 0.9, 5)
            ref[i] -= 0.1 * math.sqrt(max(1, shapes[i][-2] / shapes[i][-1])) * update
    for p, r in zip(params, ref):
        # NS amplifies float rounding (a=3.4 per iteration), so allow 1e-3; a wrong scale or momentum is >1e-2 off
        torch.testing.assert_close(p.detach(), r, rtol=1e-3, atol=1e-3)
