"""tools/preflight.py: one --quick run on the CPU (exit code, the `preflight:` JSON line, the report files); the
runner (a failing check is recorded with its traceback and the others still run; the time budget; bad arguments);
the references it trusts (chunked attention reference vs dense_attention_mask, the FlexAttention check catching a
wrong block mask); a 2-process torchrun run (gloo); and, slow, the full CPU run."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from conftest import ROOT, load_script, preflight_flex_problems
import train_gpt as tg
from features import fp8_mlp as fp8_mlp_feature

pf = load_script("tools/preflight.py")


def run_preflight(*cli, torchrun=False, timeout=900):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1") if torchrun else os.environ
    out = subprocess.run(launcher + [str(ROOT / "tools" / "preflight.py"), *cli], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("preflight: {")]
    return out, json.loads(lines[-1][len("preflight: "):]) if lines else None


def printed_report(stdout):
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("preflight: {"))[len("preflight: "):])


def assert_report_files(out_dir, report):
    (json_path,), (md_path,) = sorted(out_dir.glob("*.json")), sorted(out_dir.glob("*.md"))
    assert report["files"] == [str(json_path), str(md_path)]
    assert json.loads(json_path.read_text()) == report
    md = md_path.read_text()
    for entry in report["checks"] + report["measurements"]:
        assert f"| {entry['name']} | {entry['status']} |" in md
    return md


def test_quick_run_on_cpu_passes_and_writes_its_report(tmp_path):
    # a generous budget: the test is about what runs, not about this shared machine's load
    out, report = run_preflight("--quick", "--out", str(tmp_path), "--budget_s=100000")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert report["ok"] and report["checks_ok"] and report["measurements_ok"]
    assert report["device_type"] == "cpu" and report["world_size"] == 1 and report["quick"]
    checks = {c["name"]: c for c in report["checks"]}
    assert {"env", "flex_attention", "fp8_head", "fp8_mlp", "kron_ks_kernels", "moe",
            "compiled_training"} <= set(checks)
    for entry in report["checks"] + report["measurements"]:
        assert set(entry) >= {"name", "ok", "detail", "seconds"} and entry["ok"]
        assert f"] {entry['name']} (" in out.stdout  # one line per entry, as it goes
    for name in ("env", "flex_attention", "fp8_head", "fp8_mlp", "moe", "compiled_training"):
        assert checks[name]["status"] == "pass", checks[name]
    # fewer attention cases under --quick, but every kind still runs: both windows, MHA, GQA, MLA, the byte stream
    cases = " | ".join(report["timings"]["flex_attention_case_s"])
    for kind in ("long window", "short window", "MHA", "GQA", "MLA", "byte stream"):
        assert kind in cases, cases
    assert "delayed scales out" in checks["fp8_mlp"]["detail"]  # both passes of the FP8 MLP compared
    # under conftest's TRITON_INTERPRET=1 the Triton kernels run in the interpreter
    assert checks["kron_ks_kernels"]["status"] == ("pass" if os.environ.get("TRITON_INTERPRET") == "1" else "skip")
    assert checks["model_flex_forward"]["detail"] == "skipped: not in --quick"
    assert {"name": "model_flex_forward", "why": "not in --quick"} in report["skipped"]
    training = report["timings"]["compiled_training"]
    assert training["recompiles"] == 0 and training["graph_breaks"] == 0 and training["graphs"] == 1
    assert training["losses"] == training["eager_losses"] and training["losses"][-1] < training["losses"][0] - 0.5
    assert len(set(training["windows"])) > 1  # the window changed between steps without recompiling
    step = report["timings"]["step_time"]
    assert step["ms_per_step"] > 0 and step["tokens_per_step"] == 2 * 512 and step["grad_accum"] == 2
    assert {"--n_kv_heads=1", "--moe_experts=8 --moe_shared=1"} <= set(report["timings"]["overhead"])
    assert "CPU" in report["timings"]["label"]
    md = assert_report_files(tmp_path, report)
    assert "CPU run at smoke sizes" in md and "## Step time" in md
    assert "preflight passed" in out.stdout


def test_frontier_preset_runs_its_stages(tmp_path):
    """--flags=--preset=frontier_smoke: training follows the stages as main() does (each stage's sequence length and
    windows, YaRN, the MTP/prefix loss weights), one graph per sequence length and no other recompile; step_time
    times every stage and the extension and reports the step-weighted mean and the training time it implies; the MoE
    check drops the preset's FP8 MLP instead of failing on it."""
    out, report = run_preflight("--quick", "--flags=--preset=frontier_smoke", "--only=moe,compiled_training,step_time",
                                "--out", str(tmp_path), "--budget_s=100000")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert [c["status"] for c in report["checks"] + report["measurements"]] == ["pass"] * 3
    training = report["timings"]["compiled_training"]
    assert training["graphs"] == 3 and training["recompiles"] == 0 and training["graph_breaks"] == 0
    assert training["losses"] == training["eager_losses"] and training["losses"][-1] < training["losses"][0] - 0.5
    step = report["timings"]["step_time"]
    assert [(st["stage"], st["steps"], st["tokens_per_step"]) for st in step["stages"]] == [
        ("stage 1", 10, 512), ("stage 2", 10, 1024), ("stage 3", 10, 1536), ("extension", 3, 1536)]
    weighted = sum(st["ms_per_step"] * st["steps"] for st in step["stages"]) / 33
    assert step["steps"] == 33 and step["ms_per_step"] == pytest.approx(weighted, abs=0.01)
    assert step["est_train_s"] == pytest.approx(33 * step["ms_per_step"] / 1000, abs=0.1)
    assert "## Step time per stage" in (sorted(tmp_path.glob("*.md"))[0]).read_text()


def boom(ctx):
    raise RuntimeError("boom: something broke")


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, capsys):
    env = next(e for e in pf.REGISTRY if e.name == "env")
    registry = [pf.Entry("boom", boom, "check", fix="do the thing"), env]
    assert pf.main(["--out", str(tmp_path)], registry=registry) == 1
    captured = capsys.readouterr()
    report = printed_report(captured.out)
    failed, passed = report["checks"]
    assert not report["ok"] and not report["checks_ok"]
    assert failed["name"] == "boom" and failed["status"] == "fail" and not failed["ok"]
    assert "RuntimeError: boom: something broke" in failed["detail"] and "in boom" in failed["detail"]  # traceback
    assert failed["fix"] == "do the thing"
    assert passed["name"] == "env" and passed["ok"]
    assert "[FAIL] boom" in captured.out and "fix: do the thing" in captured.out
    assert "preflight FAILED boom" in captured.err
    md = assert_report_files(tmp_path, report)
    assert "## Failures" in md and "Fix: do the thing" in md


def test_measurements_past_the_budget_are_skipped_not_run(tmp_path, capsys):
    ran = []
    registry = [pf.Entry("costly", lambda ctx: ran.append(1), "measure", fix="-"),
                pf.Entry("headline", lambda ctx: ran.append(2) or "done", "measure", fix="-", budgeted=False)]
    assert pf.main(["--out", str(tmp_path), "--budget_s=0"], registry=registry) == 0
    report = printed_report(capsys.readouterr().out)
    costly, headline = report["measurements"]
    assert ran == [2] and report["ok"]
    assert costly["status"] == "skip" and "time budget" in costly["detail"] and "--only=costly" in costly["detail"]
    assert headline["status"] == "pass"


def recording(ran, name):
    return lambda ctx: ran.append(name) or f"{name} done"


# registry order deliberately unlike --gpu_budget_s's order of value
BUDGET_REGISTRY = [("overhead_gqa", "measure"), ("step_time", "measure"), ("flex_attention", "check"),
                   ("env", "check"), ("fp8_head", "check"), ("step_time_frontier", "measure"),
                   ("compiled_training", "check"), ("allreduce_bandwidth", "measure")]


def budget_run(tmp_path, capsys, monkeypatch, budget_s, startup_s):
    """main() under --gpu_budget_s with instant stand-ins for real entry names (so the real order and cost table
    apply), the process's startup fixed at startup_s; returns (entries run, the printed report, stdout)."""
    monkeypatch.setattr(pf, "process_age_s", lambda: startup_s)
    ran = []
    registry = [pf.Entry(name, recording(ran, name), kind, fix="-") for name, kind in BUDGET_REGISTRY]
    assert pf.main(["--out", str(tmp_path), f"--gpu_budget_s={budget_s}"], registry=registry) == 0
    out = capsys.readouterr().out
    return ran, printed_report(out), out


def test_gpu_budget_runs_gpu_only_checks_first_and_skips_what_would_not_fit(tmp_path, capsys, monkeypatch):
    cost, reserve = pf.GPU_BUDGET_COST_S, pf.GPU_BUDGET_RESERVE_S
    # room for the flex_attention check (the costliest that fits) with 10 s to spare for the stand-ins' own time;
    # not for step_time with its own compile, compiled_training, the frontier timing or an overhead variant
    budget = reserve + cost["flex_attention"] + 10
    assert cost["step_time"] + pf.STEP_TIME_COMPILE_S > budget - reserve
    assert min(cost["compiled_training"], cost["step_time_frontier"], pf.GPU_BUDGET_OTHER_S) > budget - reserve
    assert max(cost["env"], cost["fp8_head"], cost["allreduce_bandwidth"]) <= cost["flex_attention"]
    ran, report, out = budget_run(tmp_path, capsys, monkeypatch, budget, startup_s=0.0)
    order = ["env", "flex_attention", "fp8_head", "compiled_training", "step_time", "step_time_frontier",
             "overhead_gqa", "allreduce_bandwidth"]  # GPU_BUDGET_FIRST's, then the rest in registry order
    assert report["gpu_budget"]["order"] == order
    assert [line.split()[1] for line in out.splitlines() if line.startswith("[")] == order  # printed as they go
    assert ran == ["env", "flex_attention", "fp8_head", "allreduce_bandwidth"]  # a cheap one after the skips runs
    assert report["ok"] and report["quick"]  # skipped for time is not a failure; --quick sizes
    skipped = {s["name"]: s["why"] for s in report["skipped"]}
    assert list(skipped) == ["compiled_training", "step_time", "step_time_frontier", "overhead_gqa"]
    for name, why in skipped.items():
        assert why.startswith("time budget") and f"--only={name}" in why and "--gpu_budget_s" in why
    assert f"~{cost['step_time'] + pf.STEP_TIME_COMPILE_S}s expected" in skipped["step_time"]  # compiles itself
    estimates = {r["name"]: r["estimate_s"] for r in report["checks"] + report["measurements"]}
    assert estimates["flex_attention"] == cost["flex_attention"] and estimates["overhead_gqa"] == pf.GPU_BUDGET_OTHER_S
    assert report["gpu_budget"]["scale"] == 1.0 and report["gpu_budget"]["startup_s"] == 0.0
    assert "skipped for time: compiled_training, step_time, step_time_frontier, overhead_gqa" in \
        sorted(tmp_path.glob("*.md"))[0].read_text()


def test_gpu_budget_counts_the_process_startup(tmp_path, capsys, monkeypatch):
    cost, reserve = pf.GPU_BUDGET_COST_S, pf.GPU_BUDGET_RESERVE_S
    budget = reserve + cost["flex_attention"] + 10
    ran, report, _ = budget_run(tmp_path, capsys, monkeypatch, budget, startup_s=15.0)
    assert ran == ["env", "fp8_head", "allreduce_bandwidth"]  # flex_attention fits the budget, not what is left
    why = next(s["why"] for s in report["skipped"] if s["name"] == "flex_attention")
    assert "15s of them process startup" in why
    assert report["gpu_budget"]["startup_s"] == 15.0


def test_process_age_counts_from_the_process_start():
    # the process started before this module imported preflight (0.1 s: /proc's clock ticks are 10 ms)
    assert time.perf_counter() - pf.IMPORTED_AT - 0.1 <= pf.process_age_s() < 7 * 24 * 3600


def test_budget_estimates_grow_when_entries_overrun_theirs(monkeypatch):
    assert pf.budget_scale([]) == 1.0
    assert pf.budget_scale([(10.0, 2.0), (20.0, 5.0)]) == 1.0  # faster than the table: never trusted below it
    assert pf.budget_scale([(10.0, 30.0), (20.0, 30.0)]) == 2.0
    monkeypatch.setitem(pf.GPU_BUDGET_COST_S, "kron_ks_kernels", 20)
    entry = pf.Entry("kron_ks_kernels", None, "check", fix="-")
    ctx = SimpleNamespace(budget_runs=[(10.0, 30.0), (20.0, 30.0)], stash={}, budget_estimates={}, spent_s=20.0,
                          startup_s=5.0, gpu_budget_s=20.0 + pf.GPU_BUDGET_RESERVE_S + 50)  # 50 s left
    assert pf.over_gpu_budget(ctx, entry) is None and ctx.budget_estimates["kron_ks_kernels"] == 40  # 20 s x 2
    ctx.budget_runs.append((10.0, 50.0))  # one more overrun: x 2.75
    why = pf.over_gpu_budget(ctx, entry)
    assert why is not None and "~55s expected (GPU_BUDGET_COST_S x 2.75" in why and "50s left" in why


def test_list_shows_the_gpu_budget_order(capsys):
    assert pf.main(["--list", "--gpu_budget_s=480"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:len(pf.GPU_BUDGET_FIRST)] == list(pf.GPU_BUDGET_FIRST)
    assert sorted(names) == sorted(e.name for e in pf.REGISTRY)


def test_gpu_budget_on_cpu_times_the_frontier_first_stage(tmp_path):
    """The real entries under --gpu_budget_s (a budget nothing exceeds): the frontier preset (frontier_smoke on
    CPU) timed at its first stage only, peak memory skipped off a GPU, the process startup counted."""
    out, report = run_preflight("--gpu_budget_s=100000", "--only=peak_memory,step_time_frontier,env",
                                "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert report["gpu_budget"]["order"] == ["env", "step_time_frontier", "peak_memory"]
    assert report["gpu_budget"]["startup_s"] > 0  # at least torch's import
    frontier = report["timings"]["step_time_frontier"]
    assert "--preset=frontier_smoke" in frontier["flags"] and frontier["stages_timed"] == "1 of 4"
    assert [(st["stage"], st["steps"], st["tokens_per_step"]) for st in frontier["stages"]] == [("stage 1", 10, 512)]
    assert report["skipped"] == [dict(name="peak_memory", why="GPU only (a CPU timing records the process's max RSS)")]
    estimates = {r["name"]: r["estimate_s"] for r in report["checks"] + report["measurements"]}
    assert estimates["env"] == pf.GPU_BUDGET_COST_S["env"]
    assert estimates["step_time_frontier"] == pf.GPU_BUDGET_COST_S["step_time_frontier"]


def test_peak_memory_against_the_plan():
    plan = dict(peak=2 * 2 ** 30, compiled_estimate=1.5 * 2 ** 30)
    line, within = pf.peak_vs_plan(1.25, plan)
    assert within and line == "1.25 GiB vs the plan's 2.00 GiB bound (compiled estimate 1.50 GiB)"
    line, within = pf.peak_vs_plan(2.5, plan)
    assert not within and line.endswith("ABOVE the bound")
    assert pf.peak_vs_plan(1.25, None)[1]


def test_memory_plan_hook():
    """peak_memory's plan comes from tools/memory_plan.py where it has plan_memory (and none where it has not)."""
    plan = pf.memory_plan_for(["--preset=smoke"], "NVIDIA H100 80GB HBM3", 80 * 2 ** 30, (9, 0), 1)
    module = load_script("tools/memory_plan.py") if (ROOT / "tools" / "memory_plan.py").exists() else None
    if not hasattr(module, "plan_memory"):
        assert plan is None
        return
    assert plan["peak"] > plan["params"] > 0 and plan["compiled_estimate"] > 0


def test_the_fp8_mlp_check_catches_saturation(tmp_path, capsys, monkeypatch):
    """A delayed scale with too little margin clips p = relu(h W1^T)^2 in e4m3: the check must fail on it."""
    monkeypatch.setattr(fp8_mlp_feature, "FP8_MLP_P_MARGIN", 0.3)
    fp8_mlp = next(e for e in pf.REGISTRY if e.name == "fp8_mlp")
    assert pf.main(["--quick", "--out", str(tmp_path)], registry=[fp8_mlp]) == 1
    (result,) = printed_report(capsys.readouterr().out)["checks"]
    assert result["status"] == "fail" and "saturates e4m3 at its delayed scale" in result["detail"]


@pytest.mark.parametrize("argv,message", [
    (["--flags=--bogus=1"], "unknown flag --bogus"),
    (["--flags", "--bogus=1"], "unknown flag --bogus"),  # the value may follow as its own argument
    (["--flags=--num_layers=3"], "num_layers=3 must be even"),
    (["--only=env,nope"], "unknown entries ['nope']"),
    (["--gpu_budget_s=0"], "--gpu_budget_s=0 must be > 0"),
    (["--gpu_budget_s=480", "--budget_s=100"], "--budget_s and --gpu_budget_s both given"),
])
def test_bad_arguments_stop_with_a_clear_error(argv, message, tmp_path, capsys):
    assert pf.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_reports_are_never_overwritten(tmp_path):
    report = dict(date="2026-01-01", device="NVIDIA H100 80GB HBM3", device_type="cuda", world_size=8, ok=True,
                  quick=False, flags=[], seconds=1.0, environment={}, checks=[], measurements=[], timings={})
    first = pf.write_report(dict(report), tmp_path)
    second = pf.write_report(dict(report), tmp_path)
    assert [p.name for p in first] == ["2026-01-01_NVIDIA-H100-80GB-HBM3-x8.json", "2026-01-01_NVIDIA-H100-80GB-HBM3-x8.md"]
    assert [p.name for p in second] == [p.name.replace("-x8", "-x8_2") for p in first]


def test_helpers():
    assert [pf.gqa_heads(h) for h in (6, 2, 8, 12)] == [2, 1, 2, 4]
    assert pf.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and pf.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert pf.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and pf.peak_tflops("NVIDIA L40S") == 362.0
    assert pf.peak_tflops("NVIDIA L4") == 121.0 and pf.peak_tflops("Tesla V100-SXM2-32GB") is None
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"])
    model = tg.build_model(args)
    last = tg.describe_model(model, args).splitlines()[-1]
    assert last.endswith(f"= {pf.forward_flops_per_token(model, args) / 1e6:.1f}M")
    cmp = pf.Comparison(torch.float32)
    cmp.add("nan", torch.tensor([1.0, float("nan")]), torch.ones(2))
    cmp.add("off", torch.tensor([1.0, 1.1]), torch.ones(2))
    cmp.add("fine", torch.ones(2), torch.ones(2))
    with pytest.raises(pf.CheckFailed, match="nan: non-finite.*off: relative error"):
        cmp.verdict()
    stream = pf.learnable_stream(5000, 50257)
    assert (stream == tg.EOT_TOKEN).sum() >= 5 and stream.max() <= tg.EOT_TOKEN


def test_packed_documents_have_the_boundaries_the_checks_need():
    docs = tg.document_ids(pf.packed_documents(1024))
    starts = torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1
    lengths = torch.diff(torch.cat([starts, torch.tensor([1024])]))
    assert docs[0] == 0 and (lengths == 1).any()  # starts mid-document; a one-token document
    assert (starts % tg.BLOCK_SIZE != 0).any() and (lengths > 3 * tg.BLOCK_SIZE).any()


@pytest.mark.parametrize("halvings,band", [(0, None), (1, None), (0, 4 * 128)])
def test_chunked_reference_equals_sdpa_under_dense_attention_mask(halvings, band):
    tokens = pf.packed_documents(512, seed=1)
    docs = tg.document_ids(tokens)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g), \
        torch.randn(1, 2, 512, 8, generator=g)
    window = torch.tensor(3, dtype=torch.int32)
    mask = tg.dense_attention_mask(tokens, window, halvings=halvings)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12, enable_gqa=True)
    got = pf.reference_attention(q, k, v, docs, window, halvings, 0.12, band=band, chunk=128)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_flex_check_catches_a_wrong_block_mask():
    """Compiled FlexAttention honors the block lists (uncompiled CPU flex would not), so a block mask missing
    blocks that flex_block_mask lists must fail the comparison, and the script's own mask must pass."""
    def drop_last_partial_block(*args, **kwargs):
        bm = tg.flex_block_mask(*args, **kwargs)
        return BlockMask.from_kv_blocks((bm.kv_num_blocks - 1).clamp_min(0), bm.kv_indices, bm.full_kv_num_blocks,
                                        bm.full_kv_indices, BLOCK_SIZE=tg.BLOCK_SIZE, mask_mod=bm.mask_mod)
    case = pf.AttnCase("MHA", 2, 2, 32, 32, window=3)
    results = preflight_flex_problems(pf, case, pf.packed_documents(512),
                                      {"script": None, "broken": drop_last_partial_block})
    assert results["script"] == [] and results["broken"] and "relative error" in results["broken"][0]


def dense_stand_in(q, k, v, block_mask, scale, enable_gqa):
    """FlexAttention's signature over SDPA with the block mask's mask_mod evaluated densely: has a CPU backward, so
    the backward comparison (GPU only in preflight) runs here."""
    idx = torch.arange(q.size(2))
    mask = block_mask.mask_mod(0, 0, idx[:, None], idx[None, :])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


@pytest.mark.parametrize("byte_stream", [False, True])
def test_attention_backward_comparison(byte_stream):
    case = pf.AttnCase("GQA", 4, 2, 24, 16, window=3, halvings=1, byte_stream=byte_stream)
    tokens = pf.packed_documents(64 if byte_stream else 512)
    cmp = pf.Comparison(torch.float32)
    pf.run_attention_case(case, tokens, 8, 0.12, torch.float32, dense_stand_in, True, cmp)
    assert cmp.problems == [] and [n.split()[0] for n in cmp.notes[1:]] == ["dq", "dk", "dv"]
    off = pf.Comparison(torch.float32)
    pf.run_attention_case(case, tokens, 8, 0.12, torch.float32,
                          lambda q, k, v, **kw: dense_stand_in(q, k, v, **dict(kw, scale=0.125)), True, off)
    assert {p.split(":")[0] for p in off.problems} >= {"GQA out", "dq", "dk"}


def test_the_eager_reference_compiles_only_flex_attention_on_gpu():
    with pf.eager_flex_compiled(on_gpu=True):
        assert tg.flex_attention is not flex_attention  # attend() calls the compiled kernel
    assert tg.flex_attention is flex_attention
    with pf.eager_flex_compiled(on_gpu=False):
        assert tg.flex_attention is flex_attention


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (conftest sets it)")
def test_kernel_bench_rows_run_in_the_interpreter():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"])
    rows = pf.kernel_bench_rows(args, torch.device("cpu"), torch.float32, tokens=8, warmup=0, repeats=1)
    assert [(r["shape"], r["impl"]) for r in rows] == [(shape, impl) for shape in ("128->512", "512->128")
                                                       for impl in ("dense", "kron_triton", "ks_monarch_triton")]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_full_run_on_cpu(tmp_path):
    out, report = run_preflight("--out", str(tmp_path), "--budget_s=100000", timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["model_flex_forward"]["status"] == "pass"
    assert all(m["status"] in ("pass", "skip") for m in report["measurements"])
    assert len(report["timings"]["overhead"]) == 7


def test_torchrun_two_cpu_processes(tmp_path):
    out, report = run_preflight("--quick", "--only=env,allreduce_bandwidth,step_time", "--out", str(tmp_path),
                                torchrun=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert report["world_size"] == 2 and out.stdout.count("preflight: {") == 1  # rank 0 prints and writes
    assert "gloo all_reduce/all_gather round trips ok on 2 ranks" in report["checks"][0]["detail"]
    assert [m["status"] for m in report["measurements"]] == ["pass", "pass"]
    assert report["timings"]["step_time"]["world_size"] == 2 and report["timings"]["step_time"]["grad_accum"] == 1
    assert len(list(tmp_path.glob("*.json"))) == 1
