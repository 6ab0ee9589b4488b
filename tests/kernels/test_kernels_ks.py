"""Kronecker-sparse (KS) factors and chains: bmm reference, Triton kernels (fp32, interpreter on CPU), KSLinear,
pattern helpers and the benchmark smoke run (the fitting tool: tests/tools/test_ks_fit.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import (KSLinear, butterfly_patterns, check_ks_chain, ks_chain, ks_chain_dense_matrix,
                     ks_dense_matrix, ks_factor, ks_factor_ref, ks_in_features, ks_out_features, ks_param_count,
                     monarch_patterns)

ROOT = Path(__file__).resolve().parents[2]

DEVICE = "cuda" if os.environ.get("KERNEL_TESTS_ON_GPU") == "1" else "cpu"
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not importable")

# d > 1 with tiny blocks (several blocks per tile), d == 1, a == 1, non-powers of two, and blocks past the
# 64-wide tiles (b and c loops)
PATTERNS = [(2, 3, 4, 5), (1, 4, 4, 4), (4, 4, 4, 1), (3, 2, 2, 8), (1, 20, 18, 3), (2, 70, 33, 1), (3, 5, 70, 2)]
LAYOUTS = [False, True]  # bs_last


def weight_for(pattern, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kernels.ks_weight_shape(pattern), generator=g, dtype=dtype)


def tokens_first(n, features, seed=1, dtype=torch.float32):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def to_layout(x, bs_last):
    """(N, F) -> the layout's 2-D tensor."""
    return x.t().contiguous() if bs_last else x


# -----------------------------------------------------------------------------
# Reference and dense matrices

@pytest.mark.parametrize("bs_last", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_factor_matches_its_dense_matrix(pattern, bs_last):
    w = weight_for(pattern)
    dense = ks_dense_matrix(w, pattern)
    a, b, c, d = pattern
    assert dense.shape == (a * b * d, a * c * d)
    assert (dense != 0).sum() <= a * b * c * d  # the support has a*b*c*d entries
    x = tokens_first(6, a * c * d)
    y = ks_factor_ref(to_layout(x, bs_last), w, pattern, bs_last)
    torch.testing.assert_close(y.t() if bs_last else y, x @ dense.T, rtol=1e-5, atol=1e-5)


def test_dense_matrix_support_is_the_kronecker_pattern():
    a, b, c, d = pattern = (2, 3, 4, 5)
    support = (ks_dense_matrix(torch.ones(a * d, b, c), pattern) != 0).float()
    expected = torch.kron(torch.kron(torch.eye(a), torch.ones(b, c)), torch.eye(d))
    assert torch.equal(support, expected)


def test_ks_factor_keeps_leading_dims_in_both_layouts():
    pattern = (2, 3, 4, 5)
    w = weight_for(pattern)
    x = torch.randn(2, 3, 40)
    y = ks_factor(x, w, pattern)
    assert y.shape == (2, 3, 30)
    y_last = ks_factor(x.permute(2, 0, 1), w, pattern, bs_last=True)
    assert y_last.shape == (30, 2, 3)
    torch.testing.assert_close(y_last.permute(1, 2, 0), y)


@pytest.mark.parametrize("bs_last", LAYOUTS)
def test_reference_gradcheck(bs_last):
    pattern = (2, 3, 2, 3)
    w = weight_for(pattern, torch.float64).requires_grad_()
    x = to_layout(tokens_first(4, 12, dtype=torch.float64), bs_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, w_: ks_factor_ref(x_, w_, pattern, bs_last), (x, w))


# -----------------------------------------------------------------------------
# Triton kernels vs reference

@needs_triton
@pytest.mark.parametrize("bs_last", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_forward_and_backward_match_reference(pattern, bs_last):
    w = weight_for(pattern).to(DEVICE)
    x = to_layout(tokens_first(37, ks_in_features(pattern)), bs_last).to(DEVICE)
    dy = to_layout(tokens_first(37, ks_out_features(pattern), seed=2), bs_last).to(DEVICE)
    results = []
    for fn in (kernels.ks_apply, ks_factor_ref):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(x_, w_, pattern, bs_last)
        results.append((y, *torch.autograd.grad(y, (x_, w_), dy)))
    for name, got, want in zip(("y", "dX", "dW"), *results):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


# The chains KSLinear builds for GPT-2's c_fc (768 -> 3072) and c_proj (3072 -> 768). Butterfly chains launch
# thousands of tiny programs per factor (~1-2 min each under the interpreter), so they run with --slow only.
GPT2_CHAINS = [pytest.param(make, out_f, in_f, bs_last, id=f"{make.__name__[:-9]}-{in_f}to{out_f}-"
                            f"{'bs_last' if bs_last else 'bs_first'}",
                            marks=[pytest.mark.slow] if make is butterfly_patterns else [])
               for make in (monarch_patterns, butterfly_patterns) for out_f, in_f in ((3072, 768), (768, 3072))
               for bs_last in (LAYOUTS if make is monarch_patterns else [False])]


@needs_triton
@pytest.mark.parametrize("make, out_f, in_f, bs_last", GPT2_CHAINS)
def test_triton_chain_at_gpt2_mlp_shapes_matches_reference(make, out_f, in_f, bs_last):
    patterns = make(out_f, in_f)
    torch.manual_seed(0)
    weights = [w.detach().to(DEVICE) for w in KSLinear(patterns).factors]  # the init's scale keeps y O(1)
    x = to_layout(tokens_first(32, in_f), bs_last).to(DEVICE)
    dy = to_layout(tokens_first(32, out_f, seed=2), bs_last).to(DEVICE)
    results = []
    for impl in ("triton", "bmm"):
        inputs = [t.clone().requires_grad_() for t in (x, *weights)]
        y = ks_chain(inputs[0], inputs[1:], patterns, impl, bs_last)
        results.append((y, *torch.autograd.grad(y, inputs, dy)))
    names = ["y", "dX"] + [f"dW{l}" for l in range(len(patterns))]
    for name, got, want in zip(names, *results, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)


@needs_triton
@pytest.mark.parametrize("bs_last", LAYOUTS)
def test_triton_weight_grad_split_is_deterministic_sum(bs_last):
    # 150 tokens = 3 token blocks; any split into per-program partials sums to the same dW, and a repeat is
    # bitwise identical (no atomics)
    pattern = (2, 3, 4, 5)
    x = to_layout(tokens_first(150, 40), bs_last).to(DEVICE)
    dy = to_layout(tokens_first(150, 30, seed=2), bs_last).to(DEVICE)
    one = kernels._ks_weight_grad_triton(x, dy, pattern, bs_last, num_programs=1)
    w = torch.zeros(10, 3, 4, device=DEVICE, requires_grad=True)
    torch.testing.assert_close(one, torch.autograd.grad(ks_factor_ref(x, w, pattern, bs_last), w, dy)[0],
                               rtol=1e-5, atol=1e-4)
    for n in (2, 3):
        split = kernels._ks_weight_grad_triton(x, dy, pattern, bs_last, num_programs=n)
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
        assert torch.equal(split, kernels._ks_weight_grad_triton(x, dy, pattern, bs_last, num_programs=n))


@needs_triton
def test_triton_casts_fp32_weight_to_16_bit_input():
    # the interpreter has no usable bf16, so fp16 stands in for the GPU's bf16 path
    pattern = (2, 3, 20, 5)
    w = weight_for(pattern).to(DEVICE).requires_grad_()
    x = tokens_first(37, 200).to(DEVICE).half().requires_grad_()
    y = ks_factor(x, w, pattern, impl="triton")
    assert y.dtype == torch.float16
    dx, dw = torch.autograd.grad(y.float().sum(), (x, w))
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    ref = ks_factor_ref(x.detach().float(), w.detach(), pattern)
    assert ((y.float() - ref).norm() / ref.norm()) < 2e-3


# -----------------------------------------------------------------------------
# Chains, exact structured transforms

def test_hadamard_is_an_exact_butterfly_chain():
    L = 4
    patterns = butterfly_patterns(2 ** L, 2 ** L)
    assert patterns == tuple((2 ** (l - 1), 2, 2, 2 ** (L - l)) for l in range(1, L + 1))
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    weights = [h2.expand(a * d, 2, 2) for a, _, _, d in patterns]
    sylvester = h2
    for _ in range(L - 1):
        sylvester = torch.kron(sylvester, h2)
    assert torch.equal(ks_chain_dense_matrix(weights, patterns), sylvester)
    assert torch.equal(ks_chain(torch.eye(2 ** L, dtype=torch.float64), weights, patterns).T, sylvester)


@pytest.mark.parametrize("bs_last", LAYOUTS)
def test_dft_is_the_butterfly_chain_up_to_bit_reversal(bs_last):
    # Decimation in frequency: stage l (pattern (2^(l-1), 2, 2, M/2), M = 2^(L-l+1)) maps each pair
    # (x[t], x[t + M/2]) to (x[t] + x[t + M/2], (x[t] - x[t + M/2]) w_M^t); the output comes out bit-reversed.
    L = 5
    n = 2 ** L
    patterns = butterfly_patterns(n, n)
    weights = []
    for a, _, _, d in patterns:
        tw = torch.exp(-2j * math.pi * torch.arange(d, dtype=torch.float64) / (2 * d))
        block = torch.stack([torch.stack([torch.ones_like(tw), torch.ones_like(tw)], -1),
                             torch.stack([tw, -tw], -1)], -2)  # (d, 2, 2): rows j, cols k
        weights.append(block.repeat(a, 1, 1))
    bitrev = torch.tensor([int(f"{i:0{L}b}"[::-1], 2) for i in range(n)])
    x = torch.randn(3, n, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    y = ks_chain(to_layout(x, bs_last), weights, patterns, bs_last=bs_last)
    y = y.t() if bs_last else y
    torch.testing.assert_close(y[:, bitrev], torch.fft.fft(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bs_last", LAYOUTS)
def test_module_matches_product_of_dense_factors_for_every_impl(bs_last):
    patterns = [(1, 8, 4, 4), (4, 6, 8, 1)]  # a rank-2 Monarch chain 16 -> 32 -> 24
    impls = ["bmm", "auto"] + (["triton"] if kernels.HAS_TRITON else [])
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    layers = {}
    for impl in impls:
        torch.manual_seed(0)
        layers[impl] = KSLinear(patterns, impl=impl, bs_last=bs_last).to(DEVICE)
    ref = layers["bmm"]
    dense = ks_chain_dense_matrix(ref.factors, patterns)
    assert dense.shape == (24, 16)
    torch.testing.assert_close(ref.dense_weight(), dense, rtol=1e-5, atol=1e-6)
    assert list(ref.state_dict()) == ["factors.0", "factors.1"]
    for impl, layer in layers.items():
        sd = layer.state_dict()
        assert sd.keys() == ref.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
        y = layer(x)
        assert y.shape == (2, 5, 24)
        torch.testing.assert_close(y, x @ dense.T, rtol=1e-4, atol=1e-5)


def test_module_casts_params_to_input_dtype():
    layer = KSLinear(monarch_patterns(12, 8))
    assert layer(torch.randn(4, 8, dtype=torch.float64)).dtype == torch.float64


# -----------------------------------------------------------------------------
# Pattern helpers and validation

def test_butterfly_and_monarch_patterns_for_gpt2_mlp():
    for out_f, in_f in ((3072, 768), (768, 3072)):
        for make in (butterfly_patterns, monarch_patterns):
            for r in (1, 2, 4):
                patterns = make(out_f, in_f, rank=r)
                check_ks_chain(patterns)
                assert (ks_out_features(patterns[-1]), ks_in_features(patterns[0])) == (out_f, in_f)
    # 768 = 3 * 2^8: eight factors, the 3 merged into one block; params grow exactly r-fold (even length)
    fc = butterfly_patterns(3072, 768)
    assert len(fc) == 8 and fc[0] == (1, 4, 4, 192) and fc[-1] == (1536, 2, 2, 1)
    assert [ks_param_count(butterfly_patterns(3072, 768, r)) for r in (1, 2, 4, 8)] == [40960 * r for r in
                                                                                       (1, 2, 4, 8)]
    # Monarch: (1, 48r, 32, 24), (48, 64, 24r, 1), r * 48 * 24 * (32 + 64) params
    assert monarch_patterns(3072, 768, rank=4) == ((1, 192, 32, 24), (48, 64, 96, 1))
    assert monarch_patterns(768, 3072, rank=4) == ((1, 96, 64, 48), (24, 32, 192, 1))
    for r in (1, 2, 4, 8):
        assert ks_param_count(monarch_patterns(3072, 768, r)) == ks_param_count(monarch_patterns(768, 3072, r)) \
            == 110592 * r < 768 * 3072
    assert ks_param_count([(1, 4, 4, 4), (4, 6, 4, 1)]) == 64 + 96
    assert KSLinear(monarch_patterns(3072, 768, 2)).factors[0].shape == (24, 96, 32)


def test_chain_validation_and_bad_helper_inputs_raise():
    with pytest.raises(ValueError, match="do not chain: pattern 0 .* outputs a\\*b\\*d=24 .* takes a\\*c\\*d=12"):
        KSLinear([(1, 4, 4, 6), (1, 3, 4, 3)])
    with pytest.raises(ValueError, match="four positive ints"):
        KSLinear([(1, 4, 0, 6)])
    with pytest.raises(ValueError, match="at least one pattern"):
        check_ks_chain([])
    with pytest.raises(ValueError, match="impl must be one of"):
        KSLinear([(1, 4, 4, 1)], impl="dense")
    with pytest.raises(ValueError, match="must have shape"):
        ks_factor(torch.randn(3, 40), torch.randn(10, 4, 3), (2, 3, 4, 5))
    with pytest.raises(ValueError, match="takes 40 features"):
        ks_factor(torch.randn(3, 41), weight_for((2, 3, 4, 5)), (2, 3, 4, 5))
    with pytest.raises(ValueError, match="prime factors"):
        butterfly_patterns(13, 16)
    with pytest.raises(ValueError, match="valid n_factors: 2..4"):
        butterfly_patterns(16, 16, n_factors=5)
    with pytest.raises(ValueError, match="use rank <= 1"):
        butterfly_patterns(16, 16, rank=4)
    with pytest.raises(ValueError, match="use rank <= 21"):
        monarch_patterns(3072, 768, rank=22)
    with pytest.raises(ValueError, match="m1\\*m2 == 24"):
        monarch_patterns(24, 16, splits=((4, 5), (4, 4)))


def test_explicit_triton_raises_when_unusable(monkeypatch):
    x = torch.randn(3, 16)
    layer = KSLinear(monarch_patterns(24, 16), impl="triton")
    monkeypatch.setattr(kernels, "TRITON_INTERPRET", False)  # a CPU tensor without the interpreter
    with pytest.raises(RuntimeError, match="impl='bmm'"):
        layer(x)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable"):
        layer(x)
    assert KSLinear(layer.patterns, impl="auto")(x).shape == (3, 24)  # auto on CPU is bmm


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "assert not kernels.HAS_TRITON\n"
            "assert kernels.KSLinear(kernels.monarch_patterns(24, 16))(torch.randn(3, 16)).shape == (3, 24)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -----------------------------------------------------------------------------
# Init

@pytest.mark.parametrize("kind", ["monarch", "butterfly"])
def test_init_variance_matches_dense(kind):
    # dense speedrun init: std 0.5 / sqrt(in), so E[y^2] = 0.25 for unit-variance inputs and E[W^2] = 0.25 / in
    patterns = monarch_patterns(512, 256, 2) if kind == "monarch" else butterfly_patterns(512, 256, 3)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    w_var, y_var = [], []
    for _ in range(10):
        layer = KSLinear(patterns)
        with torch.no_grad():
            w_var.append(layer.dense_weight().pow(2).mean().item())
            y_var.append(layer(x).pow(2).mean().item())
    assert sum(w_var) / len(w_var) == pytest.approx(0.25 / 256, rel=0.1)
    assert sum(y_var) / len(y_var) == pytest.approx(0.25, rel=0.1)


def test_zero_init_last_learns_but_all_zero_does_not():
    torch.manual_seed(0)
    patterns = butterfly_patterns(16, 16, n_factors=3)
    x, target = torch.randn(32, 16), torch.randn(32, 16)
    layer = KSLinear(patterns, zero_init_last=True)
    assert layer.factors[-1].abs().sum() == 0 and all(w.abs().sum() > 0 for w in layer.factors[:-1])
    all_zero = KSLinear(patterns, zero_init_last=True)
    with torch.no_grad():
        for w in all_zero.factors:
            w.zero_()
    for lyr, learns in ((layer, True), (all_zero, False)):
        assert lyr(x).abs().max() == 0
        opt = torch.optim.SGD(lyr.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            opt.zero_grad()
            loss = (lyr(x) - target).pow(2).mean()
            loss.backward()
            losses.append(loss.item())
            if step == 0:  # only the last factor has a gradient
                assert (lyr.factors[-1].grad.abs().max() > 0) == learns
                assert all(w.grad.abs().max() == 0 for w in lyr.factors[:-1])
            opt.step()
        # after one step the path is open: every factor gets a gradient and the loss goes down
        assert all((w.grad.abs().max() > 0) == learns for w in lyr.factors)
        assert (losses[-1] < losses[0]) == learns


# -----------------------------------------------------------------------------
# Benchmark

def test_bench_ks_cpu_smoke(tmp_path):
    impls = ["dense", "bmm"] + (["triton"] if kernels.HAS_TRITON else [])
    cmd = [sys.executable, "tools/bench_kernels.py", "--ks", "--ks_chains", "monarch", "--shape", "32", "64",
           "--device", "cpu", "--tokens", "8", "--warmup", "0", "--repeats", "1", "--out_dir", str(tmp_path),
           "--ks_impls", *impls, "--ks_items", "all"]  # each factor too (on CPU the default is whole chains)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in next(tmp_path.glob("*_cpu.jsonl")).read_text().splitlines()]
    runs = 1 + 2 * (len(impls) - 1)  # dense once, every KS impl in both layouts
    assert len(records) == 3 * runs * 2  # (factor0, factor1, chain) x runs x passes
    assert {r["impl"] for r in records} == set(impls) and {r["layout"] for r in records} == {"bs_first", "bs_last"}
    assert all(r["bench"] == "ks" and math.isfinite(r["ms"]) and r["fwd_rel_err"] < 1e-4 for r in records)
