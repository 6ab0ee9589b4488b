"""Speed-only changes of issue 11 section 3 keep the math: the FP8 backward orientation, cached window tensors,
the non-blocking divergence check, round-robin Muon ownership. (The whole default path is pinned bitwise in
test_default_numerics.py, on one and on two ranks.)"""
import math

import pytest
import torch

import train_gpt as tg


def test_fp8_weight_gradient_orientation_is_bitwise_the_plain_product():
    torch.manual_seed(0)
    x = torch.randn(256, 768)
    w = torch.randn(1024, 768) * 0.02
    g = torch.randn(256, 1024) * 1e-4
    s = tg.FP8_HEAD_SCALES
    x8 = (x * s["x_scale"]).to(torch.float8_e4m3fn)
    w8 = (w * s["w_scale"]).to(torch.float8_e4m3fn)
    _, grad_w = tg.fp8_mm_backward(g, x8, w8, s["x_scale"], s["w_scale"], s["grad_scale"])
    g8 = (g * s["grad_scale"]).to(torch.float8_e5m2)
    plain = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), out_dtype=torch.float32,
                             scale_a=torch.tensor(1 / s["grad_scale"]), scale_b=torch.tensor(1 / s["x_scale"]))
    assert torch.equal(grad_w, plain)
    assert grad_w.abs().sum() > 0


def test_window_tensors_are_made_once_per_size_and_follow_the_schedule():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"])
    windows = tg.WindowTensors(args, torch.device("cpu"))
    for step in range(args.num_iterations + 1):
        assert windows[step].item() == tg.long_window_blocks(step, args)
        assert windows[step] is windows[step]
    assert len(windows.cache) == len({tg.long_window_blocks(s, args) for s in range(args.num_iterations + 1)})


def test_loss_watch_reports_the_first_nonfinite_step():
    watch = tg.LossWatch(torch.device("cpu"))
    watch.push(1, torch.tensor(3.0))
    assert watch.first_nonfinite() is None
    watch.push(2, torch.tensor(float("nan")))
    watch.push(3, torch.tensor(float("inf")))
    assert watch.first_nonfinite() == 2
    assert watch.first_nonfinite(wait=True) == 3
    assert watch.first_nonfinite(wait=True) is None


@pytest.mark.parametrize("n_params,world_size", [(5, 2), (6, 4), (1, 2), (7, 3)])
def test_muon_round_robin_shares_cover_every_parameter_once_and_balance(n_params, world_size):
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n_params)]
    owned = [tg.Muon(params, lr=0.1, momentum=0.9, rank=r, world_size=world_size).owned(params)
             for r in range(world_size)]
    assert sorted(id(p) for share in owned for p in share) == sorted(map(id, params))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    # the gathered layout: row r * share + j is rank r's j-th parameter = params[j * world_size + r]
    share = math.ceil(n_params / world_size)
    rows = torch.zeros(world_size * share, dtype=torch.long) - 1
    for r, mine in enumerate(owned):
        for j, p in enumerate(mine):
            rows[r * share + j] = next(i for i, q in enumerate(params) if q is p)
    order = rows.view(world_size, share).t().flatten()
    assert order[:n_params].tolist() == list(range(n_params))
