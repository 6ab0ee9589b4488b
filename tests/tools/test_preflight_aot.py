"""tools/preflight.py --aot: every Triton kernel the flags launch, compiled for named GPUs without one (Triton's
bundled ptxas), checked against each arch's limits. The tests run under TRITON_INTERPRET=1, so the compile happens in
a child process without it (preflight.aot_usage)."""
import json

import pytest

import kernels
from conftest import load_script

pf = load_script("tools/preflight.py")
FAST_ARCHS = "sm_80"  # the most register pressure; every config on sm_80/89/90: test_full_set_every_arch (slow)


def run_aot(capsys, *argv):
    code = pf.main(["--aot", *argv])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1][len("preflight: "):])
    return code, out, report


def by_label(report):
    return {(r["arch"], r["label"]): r for r in report["kernels"]}


def assert_plausible(report, archs):
    for r in report["kernels"]:
        assert r["arch"] in archs
        assert 0 < r["regs"] <= 255 and r["num_warps"] in (4, 8) and r["blocks_per_sm"] >= 1
        assert 0 < r["shared"] <= pf.AOT_ARCHS[r["arch"]].shared_block


@pytest.mark.parametrize("flags", ["", "--preset=frontier"])
def test_no_triton_kernel_passes(capsys, flags):
    code, out, report = run_aot(capsys, f"--flags={flags}")
    assert code == 0 and report["ok"] and report["kernels"] == []
    assert "launch no Triton kernel" in out


def test_kron_both_every_kernel_on_sm_80(capsys):
    code, out, report = run_aot(capsys, f"--arch={FAST_ARCHS}", "--flags=--kron_mlp=both")
    assert code == 0 and report["ok"], out
    rows = by_label(report)
    for arch in FAST_ARCHS.split(","):
        for label in ("c_fc 768->3072", "c_proj 3072->768"):
            for kind, kernel in (("forward", "_kron_apply_kernel"), ("dx", "_kron_apply_kernel"),
                                 ("weight_grad", "_kron_weight_grad_kernel")):
                assert rows[(arch, f"kron {label} {kind}")]["kernel"] == kernel
    assert len(report["kernels"]) == 6 * len(FAST_ARCHS.split(","))
    assert_plausible(report, FAST_ARCHS.split(","))


def test_ks_both_monarch_every_kernel(capsys):
    code, out, report = run_aot(capsys, "--arch=sm_90", "--flags=--ks_mlp=both --ks_impl=triton")
    assert code == 0 and report["ok"], out
    patterns = kernels.monarch_patterns(3072, 768) + kernels.monarch_patterns(768, 3072)
    sites = {s for r in report["kernels"] for s in r["sites"]}
    for which, ps in (("c_fc", kernels.monarch_patterns(3072, 768)), ("c_proj", kernels.monarch_patterns(768, 3072))):
        for i, p in enumerate(ps):
            for kind in ("forward", "dx", "weight_grad"):
                assert f"ks {which}[{i}] {p} {kind}" in sites
    assert len(patterns) == 4
    assert_plausible(report, ["sm_90"])


def test_ks_bmm_launches_nothing(capsys):
    code, out, report = run_aot(capsys, "--flags=--ks_mlp=both")  # the default --ks_impl=bmm runs no Triton
    assert code == 0 and report["kernels"] == []


def test_over_a_limit_fails_with_one_clear_line(capsys, monkeypatch):
    tiny = pf.dataclasses.replace(pf.AOT_ARCHS["sm_80"], shared_block=1024)
    monkeypatch.setitem(pf.AOT_ARCHS, "sm_80", tiny)
    code, out, report = run_aot(capsys, "--arch=sm_80", "--flags=--kron_mlp=fc")
    assert code == 1 and not report["ok"]
    fails = [line for line in out.splitlines() if line.startswith("FAIL aot: ")]
    assert fails and all("on sm_80" in f and "over the sm_80 limit 1024 B" in f for f in fails)
    assert "_kron_weight_grad_kernel" in "\n".join(fails)


def test_spill_warns_but_passes():
    row = dict(kernel="k", label="l", arch="sm_80", regs=255, stack=24, shared=32768, num_warps=8)
    fails, warns = pf.aot_verdict(row)
    assert not fails and "24 B stack" in warns[0]
    assert pf.blocks_per_sm(row, pf.AOT_ARCHS["sm_80"]) == 1


def test_launch_plans_are_what_the_launchers_launch(monkeypatch):
    """kron_apply_launches / ks_apply_launches (what --aot compiles) equal the launches a real forward + backward
    makes (interpreted here), constexprs, warps and argument specialization included."""
    import torch
    seen = []
    real_call = kernels.KernelLaunch.__call__
    monkeypatch.setattr(kernels.KernelLaunch, "__call__", lambda self: (seen.append(self), real_call(self))[1])

    def key(launch):
        spec = tuple((isinstance(a, torch.Tensor), a.dtype if isinstance(a, torch.Tensor) else a == 1,
                      a.stride() if isinstance(a, torch.Tensor) else None) for a in launch.args)
        return launch.kernel.fn.__name__, spec, tuple(sorted(launch.constexprs.items())), launch.grid, launch.num_warps

    for layer in (kernels.KronLinear(48, 96, impl="triton"), kernels.KSLinear([(1, 8, 4, 12), (8, 12, 12, 1)],
                                                                              impl="triton")):
        x = torch.randn(40, layer.in_features, requires_grad=True)
        seen.clear()
        layer(x).backward(torch.randn(40, layer.out_features))
        planned = []
        xm = torch.empty(40, layer.in_features, device="meta")
        if isinstance(layer, kernels.KronLinear):
            planned += kernels.kron_apply_launches(xm, layer.A.to("meta"), layer.B.to("meta"), sms=4)[1].values()
        else:
            for w, p in zip(layer.factors, layer.patterns):
                xm, launches = kernels.ks_apply_launches(xm, w.to("meta"), p, sms=4)
                planned += launches.values()
        assert sorted(map(key, seen)) == sorted(map(key, planned))


@pytest.mark.slow
def test_full_set_every_arch(capsys):
    for flags in ("--kron_mlp=both", "--ks_mlp=both --ks_impl=triton",
                  "--ks_mlp=both --ks_impl=triton --ks_chain=butterfly"):
        code, out, report = run_aot(capsys, f"--flags={flags}")
        assert code == 0 and report["ok"], out
        assert {r["arch"] for r in report["kernels"]} == set(pf.AOT_ARCHS)
        assert_plausible(report, list(pf.AOT_ARCHS))
