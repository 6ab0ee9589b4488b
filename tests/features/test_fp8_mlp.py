"""--fp8_mlp (issue 14, frontier recipe 3.6): the relu^2 MLP's matmuls in e4m3 on CPU (torch._scaled_mm runs there),
checked against hand computations: forward error, straight-through gradients, the delayed scales of p and W2,
eval = the plain path, flags, checkpoints, and a few training steps of the smoke model with the FP8 path forced on
(main() turns it on only on CUDA GPUs of compute capability >= 8.9)."""
import pytest
import torch

import train_gpt as tg
from features import fp8_mlp
from conftest import smoke_args

E4M3 = torch.float8_e4m3fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantized(t: torch.Tensor, scale) -> torch.Tensor:
    """t through e4m3 at scale (t / scale clamped to +-448), back in fp32: the value the FP8 matmul multiplies."""
    return (t.float() / scale).clamp(-448, 448).to(E4M3).float() * scale


def hand_mlp(h, w1, w2, p_scale=None, w2_scale=None):
    """The FP8 MLP by hand: h and W1 at their current amax / 448; p and W2 at the given scales (None = the current
    amax / 448); products in fp32, pre and p rounded to h's dtype as the op stores them. Returns (y, p)."""
    cur = lambda t: t.abs().amax().float() / 448
    pre = (quantized(h, cur(h)) @ quantized(w1, cur(w1)).t()).to(h.dtype)
    p = torch.relu(pre).square()
    y = quantized(p, cur(p) if p_scale is None else p_scale) @ quantized(w2, cur(w2) if w2_scale is None
                                                                          else w2_scale).t()
    return y, p.float()


def mlp_pair(dim=128, seed=0):
    """(FP8MLP in training mode with use_fp8 on, dense MLP with the same weights); c_proj randomized (it starts at
    zero), at the scale of a trained smoke model's."""
    args = smoke_args(f"--model_dim={dim}", "--fp8_mlp=true")
    torch.manual_seed(seed)
    fp8 = fp8_mlp.FP8MLP(args)
    with torch.no_grad():
        fp8.c_proj.weight.normal_(0, 0.02)
    fp8.use_fp8 = True
    dense = tg.MLP(smoke_args(f"--model_dim={dim}"))
    dense.load_state_dict(fp8.state_dict())  # drops the FP8 state (tested below)
    return fp8, dense


def inputs(n=256, dim=128, seed=1):
    return tg.norm(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_error_is_the_e4m3_rounding(dtype):
    """Each e4m3 cast (3 mantissa bits, per-tensor scale) has an RMS relative error of about 2^-3 / sqrt(12) x 0.72 =
    2.6% (measured: h 2.6%, W1 2.6%, W2 2.6%, p 2.7%). Independent errors add in quadrature: pre = h W1^T 3.7%,
    p = relu(pre)^2 4.3%, y = p W2^T sqrt(4.3^2 + 2.7^2 + 2.6^2) = 5.7%; measured 5.8% in fp32 and bf16 against the
    fp32 MLP (the bf16 MLP itself is at 0.5%). Bound: above 3% (the matmuls did run in FP8) and below 7%."""
    fp8, dense = mlp_pair()
    h = inputs().to(dtype)
    y = fp8(h[None])[0]
    ref = dense(h.float())
    assert y.dtype == dtype and y.shape == ref.shape
    assert 0.03 < rel(y, ref) < 0.07
    # and it is the FP8 computation by hand (first forward: p at its current amax); bf16: y's own rounding, 0.17%
    assert rel(y, hand_mlp(h, fp8.c_fc.weight, fp8.c_proj.weight)[0]) < (3e-3 if dtype == torch.bfloat16 else 1e-5)


def test_gradients_are_the_straight_through_bf16_ones():
    """The backward is that of the bf16 MLP at the FP8 forward's p, relu(pre) = sqrt(p): bitwise the hand formulas
    below; against bf16 autograd of the plain MLP (whose pre is not quantized) within the forward's error."""
    fp8, dense = mlp_pair()
    h = inputs().bfloat16().requires_grad_()
    g = torch.randn(256, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    w1, w2 = fp8.c_fc.weight, fp8.c_proj.weight
    y, p, _ = fp8_mlp.fp8_mlp(h, w1, w2, torch.zeros(()), fp8_mlp.fp8_scale(w2.detach().abs().amax()))
    y.backward(g)
    with torch.no_grad():
        hb, w1b, w2b = h.detach(), w1.bfloat16(), w2.bfloat16()
        r = p.sqrt()
        grad_r = g @ w2b
        grad_pre = 2 * r * grad_r
        assert torch.equal(h.grad, grad_pre @ w1b)
        assert torch.equal(w1.grad, (grad_pre.t() @ hb).float())
        assert torch.equal(w2.grad, (g.t() @ p).float())
    assert h.grad.dtype == torch.bfloat16 and w1.grad.dtype == w2.grad.dtype == torch.float32
    # the plain bf16 MLP: measured 3.8% (h), 3.7% (W1), 4.3% (W2): the FP8 error of pre and p, passed through
    hr = h.detach().clone().requires_grad_()
    dense.zero_grad()
    dense(hr).backward(g)
    for ours, ref in ((h.grad, hr.grad), (w1.grad, dense.c_fc.weight.grad), (w2.grad, dense.c_proj.weight.grad)):
        assert rel(ours, ref) < 0.07


def test_scales_by_rule():
    amax = lambda *v: torch.tensor(v, dtype=torch.float32)
    assert fp8_mlp.fp8_mlp_p_scale(amax(5.0), amax(0.0)).item() == pytest.approx(5 / 448)  # first forward: current
    assert fp8_mlp.fp8_mlp_p_scale(amax(5.0), amax(2.0)).item() == pytest.approx(2 * 1.8 / 448)
    w2 = torch.tensor([[0.5, -3.0], [1.0, 2.0]])
    for refreshes, prev, want in ((0, 0.0, 3 / 448), (15, 1.0, 3 / 448), (16, 1.0, 1.12 / 448),
                                  (400, 2.5, 2.5 * 1.12 / 448), (16, 0.0, 3 / 448)):
        got = fp8_mlp.fp8_mlp_w2_scale(w2, amax(prev), torch.tensor(refreshes))
        assert got.item() == pytest.approx(want, rel=1e-6), (refreshes, prev)
    assert fp8_mlp.fp8_scale(amax(0.0)).item() > 0  # the zero-initialized W2: a finite scale, zero e4m3 values


def same_amax(recorded, by_hand) -> bool:
    """The op's recorded amax(p) and the hand computation's: equal up to the last bit of the fp32 matmul, whose
    rounding depends on the CPU's BLAS path (bitwise equal on AMD avx512, 1 ulp apart on an Intel Xeon)."""
    return torch.allclose(recorded, by_hand, rtol=1e-6, atol=0)


def test_p_scale_comes_from_the_previous_forward():
    """Forward n quantizes p at forward n-1's amax(p) x 1.8 / 448 and clamps at 448; eval forwards do not count."""
    fp8, _ = mlp_pair(dim=16)
    w1, w2 = fp8.c_fc.weight.detach(), fp8.c_proj.weight.detach()
    h1, h2 = inputs(32, 16, seed=3), 2 * inputs(32, 16, seed=4)  # p ~4x larger: clamped
    y1 = fp8(h1)
    _, p1 = hand_mlp(h1, w1, w2)
    assert same_amax(fp8.p_amax, p1.amax()) and rel(y1, hand_mlp(h1, w1, w2)[0]) < 1e-5
    fp8.eval()
    fp8(h2)
    fp8.train()
    assert same_amax(fp8.p_amax, p1.amax())
    y2 = fp8(h2)
    scale = p1.amax() * 1.8 / 448
    want, p2 = hand_mlp(h2, w1, w2, p_scale=scale)
    assert (p2 / scale > 448).sum() >= 3  # some values were clamped
    assert rel(y2, want) < 1e-5
    assert rel(y2, hand_mlp(h2, w1, w2)[0]) > 1e-2  # p at its own amax would differ: the test can tell
    assert same_amax(fp8.p_amax, p2.amax())


def test_w2_scale_comes_from_the_previous_refresh_after_16_steps():
    """refresh() (before each optimizer step) records amax(W2) and counts the step. From refresh 16 on, W2 is
    quantized at the previous refresh's amax x 1.12 / 448 (clamped at +-448); before that at its current amax."""
    fp8, _ = mlp_pair(dim=16)
    h = inputs(32, 16, seed=5)
    w1, w2 = fp8.c_fc.weight.detach(), fp8.c_proj.weight
    fp8.p_amax.fill_(0)  # every forward below quantizes p at its current amax
    for step in range(17):
        old = w2.detach().abs().amax()
        fp8.refresh()
        with torch.no_grad():
            w2.mul_(1.5)  # the step grows W2 by 50%, beyond the 12% margin
        assert fp8.refreshes.item() == step + 1 and torch.equal(fp8.w2_amax, old)
        y = fp8(h)
        fp8.p_amax.fill_(0)
        current, delayed = hand_mlp(h, w1, w2.detach())[0], hand_mlp(h, w1, w2.detach(), w2_scale=old * 1.12 / 448)[0]
        if step + 1 < 16:
            assert rel(y, current) < 1e-5 and rel(y, delayed) > 1e-2, step
        else:
            assert (w2.detach().abs() / (old * 1.12 / 448) > 448).sum() > 0  # clamped
            assert rel(y, delayed) < 1e-5 and rel(y, current) > 1e-2, step


def test_eval_and_non_fp8_training_are_the_plain_path():
    fp8, dense = mlp_pair()
    h = inputs()[None]
    fp8.eval()
    assert torch.equal(fp8(h), dense(h))
    fp8.train()
    fp8.use_fp8 = False  # main() on a CPU or a GPU without FP8
    assert torch.equal(fp8(h), dense(h))
    assert fp8.p_amax.item() == 0 and fp8.refreshes.item() == 0  # no FP8 forward ran


def test_fp8_mlp_op_passes_opcheck():
    torch.manual_seed(0)
    h = tg.norm(torch.randn(32, 16)).bfloat16().requires_grad_()
    w1, w2 = torch.randn(64, 16, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    torch.library.opcheck(fp8_mlp.fp8_mlp, (h, w1, w2, torch.tensor(0.0), torch.tensor(0.01)))
    torch.library.opcheck(fp8_mlp.fp8_mlp, (h, w1, w2, torch.tensor(2.0), torch.tensor(0.01)))


def test_compiles_as_one_graph_without_recompiles():
    """Under torch.compile (aot_eager: no inductor on CPU) the FP8 MLP is one graph whose buffer updates do not
    recompile, and forward, gradients and scaling state equal eager's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = []
    for compiled in (False, True):
        fp8, _ = mlp_pair(dim=16)
        fn = torch.compile(fp8, backend="aot_eager", fullgraph=True, dynamic=False) if compiled else fp8
        outs = []
        for i, refreshes in enumerate((0, 20, 21)):
            fp8.refreshes.fill_(refreshes)
            fp8.w2_amax.fill_(0.05)
            y = fn(inputs(32, 16, seed=10 + i)[None])
            y.square().sum().backward()
            outs += [y.detach(), fp8.p_amax.clone(), fp8.c_fc.weight.grad.clone(), fp8.c_proj.weight.grad.clone()]
        runs.append(outs)
        if compiled:
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert frames == 1, f"{frames} graphs"
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_flags_default_off_and_bad_combinations_name_the_fix():
    args = smoke_args()
    assert args.fp8_mlp is False
    assert not any(isinstance(m, fp8_mlp.FP8MLP) for m in tg.build_model(args).modules())
    assert tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier"]).fp8_mlp is True
    for flags in (["--mlp_act=gelu"], ["--mlp_act=swiglu"], ["--kron_mlp=fc"], ["--ks_mlp=proj"],
                  ["--moe_experts=4"]):
        # the dense MLP's replacements name themselves (their features' replaces_dense_mlp socket)
        with pytest.raises(SystemExit, match=rf"--fp8_mlp runs the dense relu\^2 MLP in FP8, not {flags[0]}; .*"
                                             rf"--fp8_mlp=false"):
            smoke_args("--fp8_mlp=true", *flags)
    with pytest.raises(SystemExit, match="multiple of 16"):
        tg.check_config(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--model_dim=120",
                                                                  "--num_heads=2", "--fp8_mlp=true"]), 1)


def test_same_parameters_and_checkpoints_load_both_ways():
    torch.manual_seed(0)
    dense = tg.build_model(smoke_args())
    torch.manual_seed(0)
    fp8 = tg.build_model(smoke_args("--fp8_mlp=true"))
    assert [(n, p.shape) for n, p in dense.named_parameters()] == [(n, p.shape) for n, p in fp8.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(dense.parameters(), fp8.parameters()))  # same init draws
    assert sum(isinstance(m, fp8_mlp.FP8MLP) for m in fp8.modules()) == 4
    for m in fp8.modules():
        if isinstance(m, fp8_mlp.FP8MLP):
            m.p_amax.fill_(3.0), m.refreshes.fill_(7)
    fp8_state = fp8.state_dict()
    assert "blocks.0.mlp.p_amax" in fp8_state and "blocks.0.mlp.p_amax" not in dense.state_dict()
    dense.load_state_dict(fp8_state)  # strict: the FP8 state is dropped
    torch.manual_seed(1)
    fresh = tg.build_model(smoke_args("--fp8_mlp=true"))
    fresh.load_state_dict(dense.state_dict())  # strict: the FP8 state starts fresh
    assert fresh.blocks[0].mlp.p_amax.item() == 0 and fresh.blocks[0].mlp.refreshes.item() == 0
    fresh.load_state_dict(fp8_state)
    assert fresh.blocks[0].mlp.p_amax.item() == 3.0 and fresh.blocks[0].mlp.refreshes.item() == 7


def fp8_smoke(*flags):
    args = smoke_args("--fp8_mlp=true", *flags)
    torch.manual_seed(0)
    model = tg.build_model(args)
    for m in model.modules():
        if isinstance(m, fp8_mlp.FP8MLP):
            m.use_fp8 = True  # as main() does on an FP8 GPU
    return args, model, tg.build_optimizers(model, args)


def batch(args, seed=1):
    tokens = torch.randint(0, args.vocab_size, (args.micro_batches, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(seed))
    return [(t[:-1].int(), t[1:].long()) for t in tokens]


def steps(model, opts, args, start, stop, micro):
    return [tg.train_step(model, opts, micro, torch.tensor(tg.long_window_blocks(s, args), dtype=torch.int32), args,
                          s, 1).item() for s in range(start, stop)]


def test_smoke_model_trains_with_fp8_mlps_and_resumes_exactly(tmp_path):
    """--preset=smoke --fp8_mlp=true (cut to 2 blocks, 128-token sequences and a 512-token vocabulary, for speed) with
    the FP8 path on: finite falling loss on a repeated batch; the Muon hook refreshes the W2 state every step; a run
    resumed from a checkpoint (crossing the 16-step rule) equals the uninterrupted one bitwise, FP8 state included."""
    flags = ("--micro_batches=1", "--seq_len=128", "--vocab_size=512", "--num_layers=2", "--no_attn_layers=")
    args, model, opts = fp8_smoke(*flags)
    micro = batch(args)
    mlp = model.blocks[0].mlp
    losses = steps(model, opts, args, 0, 3, micro)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0] - 0.5, losses
    assert mlp.refreshes.item() == 3 and mlp.p_amax.item() > 0 and mlp.w2_amax.item() > 0
    for m in model.modules():
        if isinstance(m, fp8_mlp.FP8MLP):
            m.refreshes.fill_(15)  # so that the two steps below cross into the delayed W2 scale
    path = tg.save_checkpoint(tmp_path / "c.pt", model, opts, args, 3, 0.0)
    uninterrupted = steps(model, opts, args, 3, 5, micro)
    _, resumed, resumed_opts = fp8_smoke(*flags)
    ckpt = tg.load_checkpoint(str(path))
    resumed.load_state_dict(ckpt["model"])
    for opt, state in zip(resumed_opts, ckpt["optimizers"]):
        opt.load_state_dict(state)
    assert steps(resumed, resumed_opts, args, 3, 5, micro) == uninterrupted
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert mlp.refreshes.item() == 17 and uninterrupted[-1] < losses[-1]
