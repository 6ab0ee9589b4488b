"""Kronecker linear layers: references, Triton kernels (fp32, interpreter on CPU), module, Van Loan, tools."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import (KronLinear, choose_kron_factors, kron_dense_weight, kron_linear, kron_linear_ref,
                     kron_macs_per_token, kron_param_count, van_loan_decompose)

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if os.environ.get("KERNEL_TESTS_ON_GPU") == "1" else "cpu"
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not importable")

# (m1, k1, m2, k2, rank): non-powers of two, dims past 16 (two-tile padding), and both cheaper orders
SHAPES = [(3, 5, 4, 6, 1), (6, 4, 5, 3, 2), (5, 7, 3, 2, 3), (24, 20, 17, 18, 2)]
# plus the factors KronLinear picks for GPT-2's c_fc (768 -> 3072) and c_proj (3072 -> 768)
TRITON_SHAPES = SHAPES + [(48, 32, 64, 24, 1), (24, 64, 32, 48, 1)]


def factors(m1, k1, m2, k2, rank, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, m1, k1, generator=g, dtype=dtype)
    B = torch.randn(rank, m2, k2, generator=g, dtype=dtype)
    return A.to(device), B.to(device)


# -----------------------------------------------------------------------------
# References

@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_kron_materialization(shape):
    *f, rank = shape
    A, B = factors(*f, rank)
    x = torch.randn(2, 3, f[1] * f[3], generator=torch.Generator().manual_seed(1))
    y = kron_linear_ref(x, A, B)
    assert y.shape == (2, 3, f[0] * f[2])
    dense = x @ kron_dense_weight(A, B).T  # |y| reaches ~100 at the largest shape: fp32 sums in either order
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-6 * dense.abs().max().item())  # differ by ~1e-6 of that


@pytest.mark.parametrize("shape", [(3, 4, 2, 5, 2), (4, 2, 5, 3, 1)])  # one of each contraction order
def test_reference_gradcheck(shape):
    *f, rank = shape
    A, B = factors(*f, rank, dtype=torch.float64)
    x = torch.randn(3, f[1] * f[3], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(kron_linear_ref, (x.requires_grad_(), A.requires_grad_(), B.requires_grad_()))


# -----------------------------------------------------------------------------
# Triton kernels vs reference

@needs_triton
@pytest.mark.parametrize("a_first", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_forward_matches_reference(shape, a_first):
    *f, rank = shape
    A, B = factors(*f, rank, device=DEVICE)
    x = torch.randn(37, f[1] * f[3], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = kernels._kron_apply_triton(x, A, B, a_first=a_first)
    torch.testing.assert_close(y, kron_linear_ref(x, A, B), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_backward_matches_reference(shape):
    *f, rank = shape
    A, B = factors(*f, rank, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, f[1] * f[3], generator=g).to(DEVICE)
    dy = torch.randn(3, 13, f[0] * f[2], generator=g).to(DEVICE)
    grads = []
    for fn in (lambda *t: kron_linear(*t, impl="triton"), kron_linear_ref):
        inputs = [t.clone().requires_grad_() for t in (x, A, B)]
        y = fn(*inputs)
        grads.append((y, *torch.autograd.grad(y, inputs, dy)))
    for name, got, want in zip(("y", "dX", "dA", "dB"), *grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=name)


@needs_triton
def test_triton_weight_grad_split_is_deterministic_sum():
    # the per-program partial sums must add up to the same total whatever the number of programs
    A, B = factors(5, 7, 3, 2, 2, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(150, 14, generator=g).to(DEVICE), torch.randn(150, 15, generator=g).to(DEVICE)
    one = kernels._kron_weight_grad_triton(x, dy, A, B, num_programs=1)
    for n in (2, 3):
        for got, want in zip(kernels._kron_weight_grad_triton(x, dy, A, B, num_programs=n), one):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# -----------------------------------------------------------------------------
# Module

def test_module_state_dict_and_outputs_agree_across_impls():
    impls = ["torch", "dense", "auto"] + (["triton"] if kernels.HAS_TRITON else [])
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    layers, outputs = {}, {}
    for impl in impls:
        torch.manual_seed(0)
        layers[impl] = KronLinear(20, 12, rank=2, impl=impl).to(DEVICE)
        outputs[impl] = layers[impl](x)
    ref = layers["torch"].state_dict()
    assert set(ref) == {"A", "B"}
    for impl in impls:
        sd = layers[impl].state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert outputs[impl].shape == (2, 5, 12)
        torch.testing.assert_close(outputs[impl], outputs["torch"], rtol=1e-4, atol=1e-5)


def test_module_casts_params_to_input_dtype():
    layer = KronLinear(6, 10, impl="torch")
    assert layer(torch.randn(4, 6, dtype=torch.float64)).dtype == torch.float64


def test_choose_factors_products_and_balance():
    for in_f, out_f in [(768, 3072), (3072, 768), (20, 12), (7, 10), (64, 64)]:
        m1, k1, m2, k2 = choose_kron_factors(in_f, out_f)
        assert (m1 * m2, k1 * k2) == (out_f, in_f)
    # GPT-2 MLP: balanced splits 24x32 / 48x64, and the cheaper of their orientations
    assert choose_kron_factors(768, 3072) == (48, 32, 64, 24)
    assert kron_macs_per_token(48, 32, 64, 24) == 110592 < 768 * 3072
    assert kron_param_count(48, 32, 64, 24, rank=2) == 2 * (48 * 32 + 64 * 24)
    assert KronLinear(768, 3072).factors == (48, 32, 64, 24)


def test_bad_explicit_factors_and_impl_raise():
    with pytest.raises(ValueError, match="m1\\*m2 == out_features"):
        KronLinear(20, 12, factors=(3, 4, 5, 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        KronLinear(20, 12, impl="cuda")
    assert KronLinear(20, 12, factors=(3, 4, 4, 5)).A.shape == (1, 3, 4)


def test_explicit_triton_raises_when_unusable(monkeypatch):
    x = torch.randn(3, 20)
    monkeypatch.setattr(kernels, "TRITON_INTERPRET", False)  # a CPU tensor without the interpreter
    with pytest.raises(RuntimeError, match="impl='torch'"):
        KronLinear(20, 12, impl="triton")(x)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable"):
        KronLinear(20, 12, impl="triton")(x)
    assert KronLinear(20, 12, impl="auto")(x).shape == (3, 12)  # auto on CPU is the torch path


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "assert not kernels.HAS_TRITON\n"
            "assert kernels.KronLinear(20, 12)(torch.randn(3, 20)).shape == (3, 12)\n"
            "try:\n    kernels.KronLinear(20, 12, impl='triton')(torch.randn(3, 20))\n"
            "except RuntimeError as e:\n    print('raised', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout


@pytest.mark.parametrize("rank", [1, 3])
def test_init_variance_matches_dense(rank):
    # Dense speedrun init: std 0.5 / sqrt(in), so E[y^2] = 0.25 for unit-variance inputs.
    in_f, out_f = 256, 512
    x = torch.randn(512, in_f, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    w_var, y_var = [], []
    for _ in range(10):
        layer = KronLinear(in_f, out_f, rank=rank, impl="torch")
        w_var.append(kron_dense_weight(layer.A, layer.B).var().item())
        y_var.append(layer(x).pow(2).mean().item())
    assert sum(w_var) / len(w_var) == pytest.approx(0.25 / in_f, rel=0.1)
    assert sum(y_var) / len(y_var) == pytest.approx(0.25, rel=0.1)


def test_zero_init_learns_but_all_zero_does_not():
    torch.manual_seed(0)
    x, target = torch.randn(32, 20), torch.randn(32, 12)
    layer = KronLinear(20, 12, rank=2, zero_init=True, impl="torch")
    assert layer.B.abs().sum() == 0 and layer.A.abs().sum() > 0
    both_zero = KronLinear(20, 12, rank=2, zero_init=True, impl="torch")
    with torch.no_grad():
        both_zero.A.zero_()
    for lyr, learns in ((layer, True), (both_zero, False)):
        assert lyr(x).abs().max() == 0
        opt = torch.optim.SGD(lyr.parameters(), lr=0.1)
        (lyr(x) - target).pow(2).mean().backward()
        assert (lyr.B.grad.abs().max() > 0) == learns
        assert lyr.A.grad.abs().max() == 0  # dA = (dY B) X^T vanishes while B is zero
        opt.step()
        assert (lyr(x).abs().max() > 0) == learns


# -----------------------------------------------------------------------------
# Van Loan and tools

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_van_loan_recovers_exact_kron_sum(rank):
    f = (6, 4, 5, 3)
    W = kron_dense_weight(*factors(*f, rank))
    A, B = van_loan_decompose(W, *f, rank=rank)
    assert A.shape == (rank, 6, 4) and B.shape == (rank, 5, 3)
    assert ((kron_dense_weight(A, B) - W).norm() / W.norm()) < 1e-5


def test_van_loan_error_decreases_with_rank():
    f = (6, 4, 5, 3)
    W = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))
    errs = [(kron_dense_weight(*van_loan_decompose(W, *f, rank=r)) - W).norm().item() for r in range(1, 16)]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-4 * W.norm()  # full rank reproduces W
    with pytest.raises(ValueError):
        van_loan_decompose(W, 6, 4, 5, 3, rank=16)


@pytest.mark.parametrize("wrapped", [True, False])
def test_kron_decompose_cli_round_trip(tmp_path, capsys, wrapped):
    sys.path.insert(0, str(ROOT / "tools"))
    import kron_decompose

    fc = kron_dense_weight(*factors(8, 3, 5, 2, 2))  # c_fc (40, 6), exactly Kronecker rank 2
    state = {"h.0.mlp.c_fc.weight": fc, "h.0.mlp.c_proj.weight": torch.randn(6, 40),
             "h.0.attn.c_q.weight": torch.randn(6, 6), "lm_head.weight": torch.randn(10, 6)}
    ckpt = {"model": state, "step": 7} if wrapped else state
    torch.save(ckpt, tmp_path / "in.pt")
    kron_decompose.main(["--checkpoint", str(tmp_path / "in.pt"), "--out", str(tmp_path / "out.pt"),
                         "--rank", "2", "--factors", "8", "3", "5", "2"])
    out = torch.load(tmp_path / "out.pt")
    if wrapped:
        assert out["step"] == 7
        out = out["model"]
    assert set(out) == {"h.0.mlp.c_fc.A", "h.0.mlp.c_fc.B", "h.0.mlp.c_proj.A", "h.0.mlp.c_proj.B",
                        "h.0.attn.c_q.weight", "lm_head.weight"}
    torch.testing.assert_close(kron_dense_weight(out["h.0.mlp.c_fc.A"], out["h.0.mlp.c_fc.B"]), fc,
                               rtol=1e-5, atol=1e-5)
    assert out["h.0.mlp.c_proj.A"].shape == (2, 3, 8) and out["h.0.mlp.c_proj.B"].shape == (2, 2, 5)
    assert torch.equal(out["lm_head.weight"], state["lm_head.weight"])
    printed = capsys.readouterr().out
    assert "h.0.mlp.c_fc.weight" in printed and "rel_frob_err=0.0000" in printed and "kron=68" in printed
    # the decomposed weights load into KronLinear
    layer = KronLinear(6, 40, rank=2, factors=(8, 3, 5, 2))
    layer.load_state_dict({"A": out["h.0.mlp.c_fc.A"], "B": out["h.0.mlp.c_fc.B"]})


def test_bench_kernels_cpu_smoke(tmp_path):
    impls = ["dense", "torch", "kron_matmul"] + (["triton"] if kernels.HAS_TRITON else [])
    cmd = [sys.executable, "tools/bench_kernels.py", "--device", "cpu", "--tokens", "8", "--warmup", "0",
           "--repeats", "1", "--out_dir", str(tmp_path), "--impls", *impls]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in next(tmp_path.glob("*_cpu.jsonl")).read_text().splitlines()]
    assert len(records) == 2 * len(impls) * 2  # shapes x impls x passes
    assert {r["impl"] for r in records} == set(impls)
    assert all(math.isfinite(r["ms"]) and r["fwd_rel_err"] < 1e-4 for r in records)
