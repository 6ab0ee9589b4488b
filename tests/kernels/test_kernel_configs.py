"""Launch config spaces of the Triton kernels (kernels.KernelConfig): the defaults are the untuned launches, every
config of each space computes the reference's result (fp32, interpreter on CPU), tools/bench_kernels.py --tune
writes a table the launchers read back, a table can only pick configs of the space, and tools/preflight.py --aot
compiles every config for each arch."""
import json
import os

import pytest
import torch

import kernels
from conftest import load_script

DEVICE = "cuda" if os.environ.get("KERNEL_TESTS_ON_GPU") == "1" else "cpu"
pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not importable")


@pytest.fixture(autouse=True)
def no_table(monkeypatch):
    """Every test starts without a config table (whatever kernel_configs.json or $KERNEL_CONFIGS hold)."""
    monkeypatch.setenv(kernels.CONFIG_TABLE_ENV, "none")
    kernels.reset_config_table()
    yield
    kernels.reset_config_table()


def use_table(monkeypatch, path):
    monkeypatch.setenv(kernels.CONFIG_TABLE_ENV, str(path))
    kernels.reset_config_table()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def gpt2_launches(dtype=torch.bfloat16, n=49152):
    """{(layer, kind): KernelLaunch} as the launchers plan them (meta tensors) for the GPT-2 MLP's Kronecker and
    Monarch layers at a training micro-batch."""
    out = {}
    with torch.device("meta"):
        for in_f, out_f in ((768, 3072), (3072, 768)):
            layer = kernels.KronLinear(in_f, out_f)
            x = torch.empty(n, in_f, dtype=dtype)
            for kind, launch in kernels.kron_apply_launches(x, layer.A, layer.B, sms=132)[1].items():
                out[(f"kron {in_f}->{out_f}", kind)] = launch
            for p in kernels.monarch_patterns(out_f, in_f):
                w = torch.empty(kernels.ks_weight_shape(p))
                x, launches = kernels.ks_apply_launches(x, w, p, sms=132)
                for kind, launch in launches.items():
                    out[(f"ks {p}", kind)] = launch
    return out


# -----------------------------------------------------------------------------
# Spaces and defaults

def test_defaults_are_the_untuned_launches():
    # What every launch used before the spaces existed (2 tokens per program, 8 warps for the Kronecker kernels at
    # GPT-2's shapes; 64 tokens, 4 warps for KS), Triton's default stages; each the first entry of its space.
    launches = gpt2_launches()
    assert len(launches) == 2 * 3 + 4 * 3
    for (layer, kind), launch in launches.items():
        expected = kernels.KernelConfig(2, 8) if layer.startswith("kron") else kernels.KernelConfig(64, 4)
        assert launch.config == launch.space[0] == expected, (layer, kind)
        block = launch.constexprs["BLOCK_T" if layer.startswith("kron") else "BLOCK_N"]
        assert (block, launch.num_warps, launch.num_stages) == tuple(expected)


def test_spaces_are_small_distinct_and_named_by_shape():
    launches = gpt2_launches()
    for (layer, kind), launch in launches.items():
        space = launch.space
        assert len(set(space)) == len(space), (layer, kind, space)
        assert all(c.num_warps in (4, 8) and c.num_stages in (None, 2) for c in space)
        assert launch.key.startswith(("kron_" if layer.startswith("kron") else "ks_")
                                     + ("weight_grad" if kind == "weight_grad" else "apply"))
        assert launch.key.endswith("bfloat16")
    # the default, then one step along each axis (see kernels._kron_space, _ks_space)
    kron, ks = launches[("kron 768->3072", "forward")].space, launches[("ks (1, 48, 32, 24)", "weight_grad")].space
    assert [tuple(c) for c in kron] == [(2, 8, None), (4, 8, None), (8, 8, None), (2, 4, None)]
    assert [tuple(c) for c in launches[("kron 768->3072", "weight_grad")].space] == [
        (2, 8, None), (4, 8, None), (2, 4, None), (2, 8, 2)]
    assert [tuple(c) for c in ks] == [(64, 4, None), (32, 4, None), (128, 8, None), (64, 8, None), (64, 4, 2)]
    assert launches[("ks (1, 48, 32, 24)", "forward")].space == ks[:4]
    keys = {launch.key for launch in launches.values()}
    assert "kron_apply A-first p32 q24 m48 n64 r1 bfloat16" in keys and "ks_apply (1,48,32,24) bs_first bfloat16" in keys
    assert len(keys) == len(launches) == 18  # one per launch: no two launch the same problem


def test_ks_space_holds_the_tuned_configs_at_any_token_count():
    # a table tuned at a training micro-batch picks from the large-n space; small n changes only the default
    w = torch.empty(24, 48, 32, device="meta")
    big = kernels.ks_apply_launches(torch.empty(49152, 768, device="meta"), w, (1, 48, 32, 24))[1]
    for n in (1, 8, 20, 40):
        small = kernels.ks_apply_launches(torch.empty(n, 768, device="meta"), w, (1, 48, 32, 24))[1]
        for kind in small:
            assert set(big[kind].space) <= set(small[kind].space)
            assert small[kind].config == (kernels._ks_block_tokens(n), 4, None)


def test_every_config_enumerates_the_whole_space():
    with torch.device("meta"):
        layer = kernels.KronLinear(768, 3072)
        x = torch.empty(49152, 768, dtype=torch.bfloat16)
        every = kernels.every_config(kernels.kron_apply_launches, x, layer.A, layer.B, sms=132)
    for kind, launches in every.items():
        assert [l.config for l in launches] == list(launches[0].space)
        for l in launches:
            assert l.constexprs["BLOCK_T"] == l.config.block and l.num_warps == l.config.num_warps
            assert l.num_stages == l.config.num_stages
        if kind != "weight_grad":
            assert [l.grid[0] for l in launches] == [49152 // l.config.block for l in launches]


def test_a_config_outside_the_space_is_refused():
    x, A, B = randn(8, 30), randn(1, 3, 5), randn(1, 4, 6)
    with pytest.raises(ValueError, match="not in the config space"):
        kernels._kron_apply_plan(x, A, B, config=kernels.KernelConfig(3, 4))


# -----------------------------------------------------------------------------
# Every config computes the reference's result (the interpreter ignores warps and stages, so what differs here is
# the tokens per program: masking of the last block, the weight grads' token loop and partial sums)

# (m1, k1, m2, k2, rank): dims padded to 32 (2x, 4x the default's 8 tokens per program stay under the cap of 64),
# one of each contraction order, rank 2 for the rank loop
KRON_SHAPES = [(24, 20, 17, 18, 2), (17, 18, 24, 20, 1)]


@pytest.mark.parametrize("shape", KRON_SHAPES)
def test_every_kron_config_matches_the_reference(shape):
    *f, rank = shape
    A, B = randn(rank, f[0], f[1], seed=1), randn(rank, f[2], f[3], seed=2)
    n = 37  # not a multiple of any block
    x, dy = randn(n, f[1] * f[3], seed=3), randn(n, f[0] * f[2], seed=4)
    inputs = [t.clone().requires_grad_() for t in (x, A, B)]
    y_ref = kernels.kron_linear_ref(*inputs)
    dx_ref, da_ref, db_ref = torch.autograd.grad(y_ref, inputs, dy)
    every = kernels.every_config(kernels.kron_apply_launches, x, A, B, sms=4)
    assert {l.config.block for l in every["forward"]} == {8, 16, 32}
    assert {l.config.block for l in every["weight_grad"]} == {8, 16}
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)
    for launch in every["forward"]:
        y, plan = kernels._kron_apply_plan(x, A, B, config=launch.config)
        plan()
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4, msg=f"forward {launch.config}")
    for launch in every["dx"]:
        dx, plan = kernels._kron_apply_plan(dy, At, Bt, config=launch.config)
        plan()
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4, msg=f"dx {launch.config}")
    for launch in every["weight_grad"]:
        (da, db), plan = kernels._kron_weight_grad_plan(x, dy, A, B, num_programs=2, config=launch.config)
        plan()
        torch.testing.assert_close(da.sum(0), da_ref, rtol=1e-4, atol=1e-3, msg=f"dA {launch.config}")
        torch.testing.assert_close(db.sum(0), db_ref, rtol=1e-4, atol=1e-3, msg=f"dB {launch.config}")


# d > 1 with small blocks (several per tile), and d == 1 with blocks past 16
KS_PATTERNS = [(2, 3, 4, 5), (3, 20, 18, 1)]


@pytest.mark.parametrize("bs_last", [False, True])
@pytest.mark.parametrize("pattern", KS_PATTERNS)
def test_every_ks_config_matches_the_reference(pattern, bs_last):
    a, b, c, d = pattern
    n = 150  # 2-5 token blocks of 32..128, the last partial
    w = randn(a * d, b, c, seed=1)
    x, dy = randn(n, a * c * d, seed=2), randn(n, a * b * d, seed=3)
    if bs_last:
        x, dy = x.t().contiguous(), dy.t().contiguous()
    x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = kernels.ks_factor_ref(x_, w_, pattern, bs_last)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_, w_), dy)
    every = kernels.every_config(kernels.ks_apply_launches, x, w, pattern, bs_last, sms=4)
    assert {l.config.block for l in every["weight_grad"]} == {32, 64, 128}
    for launch in every["forward"]:
        y, plan = kernels._ks_apply_plan(x, w, pattern, bs_last, config=launch.config)
        plan()
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4, msg=f"forward {launch.config}")
    for launch in every["dx"]:
        dx, plan = kernels._ks_apply_plan(dy, w.transpose(1, 2), (a, c, b, d), bs_last, config=launch.config)
        plan()
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4, msg=f"dx {launch.config}")
    for launch in every["weight_grad"]:
        part, plan = kernels._ks_weight_grad_plan(x, dy, pattern, bs_last, num_programs=2, config=launch.config)
        plan()
        torch.testing.assert_close(part.sum(0), dw_ref, rtol=1e-4, atol=1e-4, msg=f"dw {launch.config}")


# -----------------------------------------------------------------------------
# The table: bench_kernels.py --tune writes it, the launchers read it back, and nothing outside a space gets in

def layer_launches(monkeypatch, layer, x, dy):
    """The KernelLaunches a forward + backward of layer makes (interpreted), and the outputs and grads."""
    seen = []
    real_call = kernels.KernelLaunch.__call__
    monkeypatch.setattr(kernels.KernelLaunch, "__call__", lambda self: (seen.append(self), real_call(self))[1])
    x = x.clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    monkeypatch.setattr(kernels.KernelLaunch, "__call__", real_call)
    return seen, (y.detach(), *grads)


def test_tune_writes_a_table_the_launchers_read_back(monkeypatch, tmp_path, capsys):
    bench = load_script("tools/bench_kernels.py")
    table = tmp_path / "kernel_configs.json"
    torch.manual_seed(0)
    layer = kernels.KronLinear(408, 480, impl="triton")  # all four dims padded to 32: 8 tokens per program
    assert layer.factors == (20, 24, 24, 17)
    bench.main(["--tune", "--device", "cpu", "--table", str(table), "--shape", "408", "480", "--tokens", "40",
                "--warmup", "0", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "tune: 3 launches" in out and "chosen" in out
    written = json.loads(table.read_text())
    section = written["archs"]["interpreter"]
    assert section["tokens"] == 40 and len(section["configs"]) == 3
    for entry in section["configs"].values():
        assert len(entry["timings"]) == 4 and all(r["status"] == "ok" for r in entry["timings"])

    x, dy = randn(40, 408, seed=1), randn(40, 480, seed=2)
    default_launches, ref = layer_launches(monkeypatch, layer, x, dy)
    use_table(monkeypatch, table)
    tuned, got = layer_launches(monkeypatch, layer, x, dy)
    assert sorted(l.key for l in tuned) == sorted(section["configs"])  # every launch found its entry
    for launch in tuned:
        e = section["configs"][launch.key]
        assert launch.config == (e["block"], e["num_warps"], e["num_stages"])
        assert launch.constexprs["BLOCK_T"] == e["block"] and launch.num_warps == e["num_warps"]
    # whatever the (meaningless) interpreter timings chose, force the last config of each space: still the result
    for launch in default_launches:
        last = launch.space[-1]
        section["configs"][launch.key].update(block=last.block, num_warps=last.num_warps, num_stages=last.num_stages)
    table.write_text(json.dumps(written))
    kernels.reset_config_table()
    tuned, got = layer_launches(monkeypatch, layer, x, dy)
    assert all(l.config == l.space[-1] != l.space[0] for l in tuned)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    # a second --tune (KS) keeps the Kronecker entries and adds its own
    bench.main(["--tune", "--ks", "--device", "cpu", "--table", str(table), "--shape", "12", "24", "--tokens", "16",
                "--warmup", "0", "--repeats", "1"])
    merged = json.loads(table.read_text())["archs"]["interpreter"]["configs"]
    assert set(section["configs"]) < set(merged) and any(k.startswith("ks_weight_grad") for k in merged)


def test_tune_on_a_cpu_needs_an_explicit_table(capsys):
    bench = load_script("tools/bench_kernels.py")
    with pytest.raises(SystemExit):
        bench.main(["--tune", "--device", "cpu"])
    assert "--table" in capsys.readouterr().err


def write_table(path, configs, arch="interpreter"):
    path.write_text(json.dumps({"format": kernels.CONFIG_TABLE_FORMAT, "archs": {arch: {"configs": configs}}}))
    return path


def test_a_table_outside_the_space_is_an_error_naming_the_fix(monkeypatch, tmp_path):
    x, A, B = randn(8, 30), randn(1, 3, 5), randn(1, 4, 6)
    key = kernels._kron_apply_plan(x, A, B)[1].key
    # block 3 is no entry of the space (here 32 tokens per program and 8 warps by default, 64 and 8, 32 and 4)
    use_table(monkeypatch, write_table(tmp_path / "t.json", {key: {"block": 3, "num_warps": 4}}))
    with pytest.raises(kernels.KernelConfigError) as e:
        kernels.kron_apply(x, A, B)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and key in msg and "block=3" in msg
    assert "fix: rerun `python tools/bench_kernels.py --tune`" in msg and "KERNEL_CONFIGS=none" in msg
    # an entry of the space is taken; other archs' entries are not read here
    use_table(monkeypatch, write_table(tmp_path / "t2.json", {key: {"block": 64, "num_warps": 8}}))
    default = kernels._kron_apply_plan(x, A, B, config="default")[1].config
    assert kernels._kron_apply_plan(x, A, B)[1].config == (64, 8, None) != default
    use_table(monkeypatch, write_table(tmp_path / "t3.json", {key: {"block": 3, "num_warps": 4}}, arch="sm_90"))
    assert kernels._kron_apply_plan(x, A, B)[1].config == default == kernels.KernelConfig(32, 8)


@pytest.mark.parametrize("content, what", [
    ("{", "unreadable"),
    (json.dumps({"format": 99, "archs": {}}), "is not a kernel config table"),
    (json.dumps({"format": 1, "archs": {"sm_90": {}}}), "has no 'configs' object"),
    (json.dumps({"format": 1, "archs": {"sm_90": {"configs": {"k": {"block": 2}}}}}), "is not a config"),
    (json.dumps({"format": 1, "archs": {"sm_90": {"configs": {"k": {"block": "2", "num_warps": 4}}}}}),
     "expected positive ints"),
])
def test_a_malformed_table_is_an_error_naming_the_fix(monkeypatch, tmp_path, content, what):
    path = tmp_path / "t.json"
    path.write_text(content)
    use_table(monkeypatch, path)
    with pytest.raises(kernels.KernelConfigError, match=what) as e:
        kernels.kron_apply(randn(8, 30), randn(1, 3, 5), randn(1, 4, 6))
    assert str(e.value).startswith("error: ") and "fix: " in str(e.value)


def test_a_missing_table_is_an_error_and_none_means_defaults(monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path / "absent.json")
    with pytest.raises(kernels.KernelConfigError, match="does not exist; fix: "):
        kernels.kron_apply(randn(8, 30), randn(1, 3, 5), randn(1, 4, 6))
    for off in ("none", "off", ""):
        use_table(monkeypatch, off)
        assert kernels.config_table_path() is None and kernels.config_table() == {}
        assert kernels.config_table_info() is None
    table = write_table(tmp_path / "t.json", {})
    use_table(monkeypatch, table)
    info = kernels.config_table_info()
    assert info["path"] == str(table) and info["entries"] == {"interpreter": 0} and len(info["sha256"]) == 64


# -----------------------------------------------------------------------------
# tools/preflight.py --aot: every config of every launch, for each arch (compiled in child processes: see
# tests/tools/test_preflight_aot.py). These compile the same kernels as its kron test (Triton's cache shares them).

pf = load_script("tools/preflight.py")


def run_aot(capsys, *argv):
    code = pf.main(["--aot", *argv])
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1][len("preflight: "):]) if code != 2 else None
    return code, out.out + out.err, report


def assert_every_config_compiled(report, archs, flags):
    """Each launch site of the flags has one row per config of its space on every arch, all within limits."""
    args = pf.config_args(flags, on_gpu=True)
    for arch in archs:
        want = {(label, tuple(l.config)) for label, l in pf.aot_launches(args, pf.AOT_ARCHS[arch].sms, arch, True)}
        got = {(site, tuple(r["config"])) for r in report["configs"] if r["arch"] == arch for site in r["sites"]}
        assert got == want, arch
    for r in report["configs"]:
        assert 0 < r["regs"] <= 255 and r["num_warps"] in (4, 8) and 0 < r["shared"] <= \
            pf.AOT_ARCHS[r["arch"]].shared_block
        assert r["status"] in ("ok", "spills") and r["blocks_per_sm"] >= 1


def test_aot_compiles_every_config_of_the_kron_fc_launches(capsys, monkeypatch, tmp_path):
    # The cheap representative: GPT-2's c_fc Kronecker launches on sm_90 (12 configs: 4 forward, 4 dx, 4 weight
    # grad), all within the H100's limits; the defaults are what the run launches.
    code, out, report = run_aot(capsys, "--arch=sm_90", "--flags=--kron_mlp=fc")
    assert code == 0 and report["ok"], out
    assert len(report["configs"]) == 12 and report["excluded"] == []
    assert_every_config_compiled(report, ["sm_90"], ["--kron_mlp=fc"])
    assert all(r["chosen"] == r["default"] for r in report["configs"])
    assert [r["config"] for r in report["kernels"]] == [[2, 8, None]] * 3
    assert "every config of each launch's space (12 kernels compiled" in out

    # A limit between the defaults' shared memory and the largest configs': those are left out of the space for
    # that arch with their reason, and the run still passes ...
    monkeypatch.setitem(pf.AOT_ARCHS, "sm_90", pf.dataclasses.replace(pf.AOT_ARCHS["sm_90"], shared_block=72 * 1024))
    code, out, report = run_aot(capsys, "--arch=sm_90", "--flags=--kron_mlp=fc")
    assert code == 0 and report["ok"], out
    excluded = [line for line in out.splitlines() if line.startswith("EXCLUDED aot: ")]
    assert excluded and len(excluded) == len(report["excluded"]) == sum(r["status"] == "excluded"
                                                                       for r in report["configs"])
    assert all("over the sm_90 limit 73728 B" in line and "is left out of the sm_90 space" in line
               for line in excluded)
    assert "block=4 warps=8 stages=default is left out" in "\n".join(excluded)  # the 4-token weight grad
    # ... but a table that picks one of them fails
    big = next(r for r in report["configs"] if r["status"] == "excluded" and "weight_grad" in r["label"])
    key = "kron_weight_grad m1=48 k1=32 m2=64 k2=24 r1 bfloat16"
    block, warps, stages = big["config"]
    use_table(monkeypatch, write_table(tmp_path / "t.json", {key: dict(block=block, num_warps=warps,
                                                                       num_stages=stages)}, "sm_90"))
    code, out, report = run_aot(capsys, "--arch=sm_90", "--flags=--kron_mlp=fc")
    assert code == 1 and not report["ok"]
    fails = [line for line in out.splitlines() if line.startswith("FAIL aot: ")]
    assert len(fails) == 1 and "_kron_weight_grad_kernel" in fails[0] and "over the sm_90 limit" in fails[0]
    assert [r["config"] for r in report["kernels"] if "weight_grad" in r["label"]] == [big["config"]]


def test_aot_stops_at_a_table_entry_outside_the_space(capsys, monkeypatch, tmp_path):
    key = "kron_weight_grad m1=48 k1=32 m2=64 k2=24 r1 bfloat16"
    use_table(monkeypatch, write_table(tmp_path / "t.json", {key: {"block": 16, "num_warps": 8}}, "sm_89"))
    code, out, _ = run_aot(capsys, "--arch=sm_80,sm_89", "--flags=--kron_mlp=fc")
    assert code == 2
    assert "preflight: error: kernel config table" in out and "sm_89 entry" in out and "fix: " in out


@pytest.mark.slow
def test_aot_every_config_every_flag_set_on_sm80_sm89_sm90(capsys):
    # The exhaustive one: the Kronecker MLP, the Monarch and the butterfly KS MLPs, every config of every launch.
    archs = ["sm_80", "sm_89", "sm_90"]
    for flags in ("--kron_mlp=both", "--ks_mlp=both --ks_impl=triton",
                  "--ks_mlp=both --ks_impl=triton --ks_chain=butterfly"):
        code, out, report = run_aot(capsys, f"--arch={','.join(archs)}", f"--flags={flags}")
        assert code == 0 and report["ok"], out
        assert report["excluded"] == [], report["excluded"]
        assert_every_config_compiled(report, archs, flags.split())
