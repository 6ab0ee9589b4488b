"""The Triton kernels' custom ops (kernels::kron_apply, ...) under torch.compile: opcheck, strided inputs, single
layers and the smoke model compiled with fullgraph=True (no graph break) against eager (fp32, interpreter on CPU)."""
import os

import pytest
import torch

import kernels
import train_gpt as tg
from kernels import KronLinear, KSLinear, kron_linear_ref, ks_factor_ref

DEVICE = "cuda" if os.environ.get("KERNEL_TESTS_ON_GPU") == "1" else "cpu"
pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not importable")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def compiled(module):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises


def grads_of(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, dy))


# -----------------------------------------------------------------------------
# The ops themselves

def test_kron_ops_pass_opcheck():
    # (3, 5, 4, 6) factors, rank 2; the transposed factors are the strided views the backward passes
    x, A, B = randn(9, 30, seed=1), randn(2, 3, 5, seed=2), randn(2, 4, 6, seed=3)
    dy = randn(9, 12, seed=4)
    for args in ((x, A, B), (dy, A.transpose(1, 2), B.transpose(1, 2))):
        torch.library.opcheck(kernels.kron_apply, [t.clone().requires_grad_() for t in args])
    torch.library.opcheck(kernels.kron_weight_grad, (x, dy, A, B))
    torch.library.opcheck(kernels.kron_weight_grad, (x, dy, A, B), {"num_programs": 1})


@pytest.mark.parametrize("bs_last", [False, True])
def test_ks_ops_pass_opcheck(bs_last):
    a, b, c, d = pattern = (2, 3, 4, 5)
    x, dy, w = randn(9, a * c * d, seed=1), randn(9, a * b * d, seed=2), randn(a * d, b, c, seed=3)
    if bs_last:
        x, dy = x.t().contiguous(), dy.t().contiguous()
    for args in ((x, w, pattern, bs_last), (dy, w.transpose(1, 2), (a, c, b, d), bs_last)):
        torch.library.opcheck(kernels.ks_apply, (args[0].clone().requires_grad_(),
                                                 args[1].clone().requires_grad_(), *args[2:]))
    torch.library.opcheck(kernels.ks_weight_grad, (x, dy, pattern, bs_last), {"num_programs": 2})


def test_ops_read_strided_activations_in_place():
    # Every op takes its activations' strides as kernel arguments: transposed and sliced views give the same
    # results as contiguous copies (and as the references), with no copy inside the op.
    A, B = randn(2, 3, 5, seed=2), randn(2, 4, 6, seed=3)
    x = randn(60, 9, seed=1)[::2].t()  # (9, 30), strides (1, 18)
    dy = randn(12, 9, seed=4).t()
    torch.testing.assert_close(kernels.kron_apply(x, A, B), kron_linear_ref(x, A, B), rtol=1e-5, atol=1e-5)
    for got, want in zip(kernels.kron_weight_grad(x, dy, A, B), kernels.kron_weight_grad(x.contiguous(),
                                                                                          dy.contiguous(), A, B)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a, b, c, d = pattern = (2, 3, 4, 5)
    w = randn(a * d, b, c, seed=5)
    for bs_last in (False, True):
        xs = randn(a * c * d, 18, seed=6)[:, ::2] if bs_last else randn(a * c * d, 9, seed=6).t()
        dys = randn(a * b * d, 9, seed=7).t().contiguous().t() if bs_last else randn(a * b * d, 9, seed=7).t()
        torch.testing.assert_close(kernels.ks_apply(xs, w, pattern, bs_last), ks_factor_ref(xs, w, pattern, bs_last),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernels.ks_weight_grad(xs, dys, pattern, bs_last),
                                   kernels.ks_weight_grad(xs.contiguous(), dys.contiguous(), pattern, bs_last),
                                   rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Single layers compiled with fullgraph=True

def assert_compiled_matches_eager(layer, x):
    dy = randn(*x.shape[:-1], layer.out_features, seed=9)
    params = list(layer.parameters())

    def run(fn):
        x_ = x.clone().requires_grad_()
        y = fn(x_)
        return (y, *torch.autograd.grad(y, [x_, *params], dy))

    for got, want in zip(run(compiled(layer)), run(layer), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kron_linear_compiles_without_graph_break():
    torch.manual_seed(0)
    assert_compiled_matches_eager(KronLinear(20, 12, rank=2, impl="triton").to(DEVICE), randn(2, 5, 20, seed=1))


@pytest.mark.parametrize("bs_last", [False, True])
def test_ks_linear_compiles_without_graph_break(bs_last):
    torch.manual_seed(0)
    layer = KSLinear([(1, 8, 4, 4), (4, 6, 8, 1)], impl="triton", bs_last=bs_last).to(DEVICE)
    assert_compiled_matches_eager(layer, randn(2, 5, 16, seed=1))


# -----------------------------------------------------------------------------
# The smoke model compiled with fullgraph=True

def smoke_model(flags):
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--seq_len=128", *flags])
    tg.check_config(args, 1)
    torch.manual_seed(0)
    model = tg.build_model(args).to(DEVICE)
    with torch.no_grad():  # zero-initialized projections (c_proj, lm_head) would zero most gradients
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=0.02)
    return args, model


@pytest.mark.parametrize("flags", [
    pytest.param(["--kron_mlp=both", "--kron_impl=triton"], id="kron"),  # ~16 s
    pytest.param(["--ks_mlp=both", "--ks_impl=triton"], id="ks", marks=pytest.mark.slow),  # ~40 s: 16 KS factors
])
def test_smoke_model_compiles_without_graph_break(flags):
    args, model = smoke_model(flags)
    tokens = torch.randint(0, args.vocab_size, (args.seq_len + 1,), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:-1].to(DEVICE), tokens[1:].to(DEVICE)
    window = torch.tensor(2, dtype=torch.int32, device=DEVICE)
    results = []
    for fn in (model, compiled(model)):
        model.zero_grad(set_to_none=True)
        loss = fn(inputs, targets, window)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and all(g is not None for g in grads.values())
    factorized = [n for n in grads if ".mlp.c_fc." in n or ".mlp.c_proj." in n]
    assert factorized and all(grads[n].abs().max() > 0 for n in factorized)  # the ops' backward did run
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
