"""Cautious Adam (--adam_wd, features/cautious_adam.py; frontier recipe 2.2): one step by hand, and the batched
foreach step equal to the per-tensor loop bit for bit. Its groups and weight decays in a model: test_frontier.py."""
import pytest
import torch

import features.cautious_adam as cautious_adam_feature


def test_cautious_adam_one_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    w.grad = torch.tensor([1.0, 1.0, -2.0, 1.0])
    lr, b1, b2, eps, wd = 0.1, 0.5, 0.95, 1e-10, 0.005 * 150
    opt = cautious_adam_feature.CautiousAdam([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    before = w.detach().clone()
    opt.step()
    g = torch.tensor([1.0, 1.0, -2.0, 1.0])
    update = lr * (1 - b2) ** 0.5 / (1 - b1) * ((1 - b1) * g) / (((1 - b2) * g * g).sqrt() + eps)
    decayed = before - lr * lr * wd * before * torch.tensor([1.0, 0.0, 0.0, 0.0])  # strict: W = 0 is not decayed
    assert torch.allclose(w.detach(), decayed - update)


@torch.no_grad()
def loop_cautious_adam_step(params, state, lr, b1, b2, eps, wd):
    """CautiousAdam's step one tensor at a time, written out (the form the foreach batches must equal)."""
    for p in params:
        if p.grad is None:
            continue
        s = state.setdefault(p, dict(step=0, m=torch.zeros_like(p, dtype=torch.float32),
                                     v=torch.zeros_like(p, dtype=torch.float32)))
        s["step"] += 1
        t, g = s["step"], p.grad.float()
        s["m"].lerp_(g, 1 - b1)
        s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        update = s["m"] / (s["v"].sqrt() + eps) * (lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t))
        update.add_(p.float() * (update * p.float() > 0), alpha=lr * lr * wd)  # the record's single subtraction
        p.sub_(update)


@pytest.mark.parametrize("foreach_numel", [1 << 20, 64])  # everything batched / the 300-element tensor alone
def test_cautious_adam_batches_equal_the_loop_bit_for_bit(monkeypatch, foreach_numel):
    """Small tensors go through torch._foreach ops per (device, dtype), large ones alone; both are the loop's
    arithmetic: fp32 and bf16 tensors, zeros (never decayed), a tensor without a gradient, 4 steps."""
    monkeypatch.setattr(cautious_adam_feature.CautiousAdam, "FOREACH_NUMEL", foreach_numel)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (1,), (10, 30), (4, 5), (7,)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(d))
                    for i, (s, d) in enumerate(zip(shapes, dtypes))]
    ours, ref = make(), make()
    with torch.no_grad():
        ours[0][1] = ref[0][1] = 0.0
    opt, state = cautious_adam_feature.CautiousAdam(ours, lr=0.05, betas=(0.5, 0.95), eps=1e-10, weight_decay=0.75), {}
    for _ in range(4):
        grads = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = (None, None) if a.shape == (7,) else (g.clone(), g.clone())
        opt.step()
        loop_cautious_adam_step(ref, state, 0.05, 0.5, 0.95, 1e-10, 0.75)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert ours[-1].grad is None and ours[-1] not in opt.state and opt.state[ours[0]]["step"] == 4
