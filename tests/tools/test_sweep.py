"""tools/sweep.py: grids of flags x seeds run with a stand-in for train_gpt.py (tests/tools/test_records_tool.py's `fake`),
resumed after crashes and Ctrl-C, checked against a time budget (from records, --ms_per_step or probe runs), with
the results table and the L(N, D) scaling-law fit."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_one_error_line, load_script
from test_records_tool import fake  # noqa: F401  (a fixture: the stand-in train_gpt.py)
from tools import records

sweep = load_script("tools/sweep.py")


def calls(tmp_path):
    path = tmp_path / "calls.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sweep_resumes_after_a_crash(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("FAKE_CRASH_ONCE", "lr=0.02,cooldown_frac=0.5")
    monkeypatch.setenv("FAKE_DIVERGE", "lr=0.02,cooldown_frac=0.4")
    argv = ["--grid", "lr=0.01,0.02", "--grid", "cooldown_frac=0.4,0.5", "--seeds", "0",
            "--train_cmd", f"python {fake.path}", "--records_dir", "records", "--sweep_name", "t", "--gpus", "0"]
    assert sweep.main(argv) == 1  # one cell crashed
    first = calls(tmp_path)
    assert len(first) == 4 and {(c["lr"], c["cooldown_frac"]) for c in first} == {
        ("0.01", "0.4"), ("0.01", "0.5"), ("0.02", "0.4"), ("0.02", "0.5")}
    assert {c["run_name"] for c in first} == {"t.lr=0.01,cooldown_frac=0.4", "t.lr=0.01,cooldown_frac=0.5",
                                              "t.lr=0.02,cooldown_frac=0.4", "t.lr=0.02,cooldown_frac=0.5"}
    assert all(c["seed"] == "0" and c["records_dir"] == "records" for c in first)
    state = json.loads((tmp_path / "records" / "sweeps" / "t.json").read_text())
    status = {(v["flags"]["lr"], v["flags"]["cooldown_frac"]): v["status"] for v in state["runs"].values()}
    assert status == {("0.01", "0.4"): "ok", ("0.01", "0.5"): "ok", ("0.02", "0.4"): "failed",
                      ("0.02", "0.5"): "error"}
    assert all(Path(v["record"]).exists() for v in state["runs"].values() if v["status"] == "ok")

    assert sweep.main(argv) == 0  # reruns the crashed cell only; the diverged one is finished
    rerun = calls(tmp_path)[4:]
    assert len(rerun) == 1 and (rerun[0]["lr"], rerun[0]["cooldown_frac"]) == ("0.02", "0.5")
    assert sweep.main(argv) == 0 and len(calls(tmp_path)) == 5  # everything finished: nothing runs
    assert sweep.main(argv + ["--retry_failed"]) == 0
    assert [(c["lr"], c["cooldown_frac"]) for c in calls(tmp_path)[5:]] == [("0.02", "0.4")]

    # the table lists the crashed attempt and both diverged attempts next to the good runs
    capsys.readouterr()
    rows = records.table_rows(records.load_runs([tmp_path / "records"]))
    assert sorted(r["runs"] for r in rows) == ["0/2 (2 failed)", "1/1", "1/1", "1/2 (1 failed)"]

    # a new seed is estimated from the finished runs' step_avg: 4 runs x 20 steps x 50 ms = 4 s > 3.6 s
    assert sweep.main(argv[:-6] + ["--seeds", "1", "--budget_hours", "0.001"] + argv[-4:]) == 2
    assert "exceeds --budget_hours" in capsys.readouterr().err and len(calls(tmp_path)) == 6


def test_sweep_budget_refusal(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--grid", "num_iterations=1000,2000", "--seeds", "0,1", "--train_cmd", f"python {fake.path}",
            "--gpus", "0"]
    # 2 seeds x (1000 + 2000) steps x 100 ms = 600 s = 0.167 h
    assert sweep.main(base + ["--ms_per_step", "100", "--budget_hours", "0.1"]) == 2
    captured = capsys.readouterr()
    assert "refusing to start" in captured.err and "0.17 h" in captured.err
    assert "step time num_iterations=1000: 100.0 ms/step from --ms_per_step; 1000 steps x 2 run(s)" in captured.out
    assert sweep.main(base + ["--ms_per_step", "100", "--budget_hours", "0.2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "0.17 h" in out and out.count("--num_iterations=") == 4 and "--seed=1" in out
    assert sweep.main(base + ["--nproc", "2", "--dry_run", "--", "--lr=0.02"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.search(r"-m torch\.distributed\.run --standalone --nproc_per_node=2 \S*fake_train\.py "
                     r"--num_iterations=2000 --lr=0\.02 --records_dir=records --run_name=num_iterations=2000 "
                     r"--seed=1$", line), line
    assert not calls(tmp_path) and not (tmp_path / "records" / "sweeps").exists()


def test_sweep_probes_the_step_time_without_records(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the README's command: --budget_hours alone, no records, no --ms_per_step
    base = ["--grid", "num_iterations=1000,2000", "--seeds", "0,1", "--train_cmd", f"python {fake.path}",
            "--gpus", "0", "--sweep_name", "b"]
    # each cell is probed: the fake logs 50 ms/step; 2 seeds x (1000 + 2000) steps x 50 ms = 300 s = 0.083 h
    assert sweep.main(base + ["--budget_hours", "0.05"]) == 2
    captured = capsys.readouterr()
    assert "step time num_iterations=1000: 50.0 ms/step from a 20-step probe run; 1000 steps x 2 run(s)" \
        in captured.out
    assert "estimated 0.08 h exceeds --budget_hours 0.05" in captured.err
    probes = calls(tmp_path)
    assert len(probes) == 2 and all(c["val_every"] == "20" and c["save_every"] == "0" for c in probes)
    assert all(Path(c["records_dir"]).parts[:4] == ("records", "local", "sweeps", "b") for c in probes)
    assert records.load_runs([tmp_path / "records"], records.NON_RUN_DIRS + ("local",)) == []  # not runs
    # a rerun reuses the probes; a cell without num_iterations takes the probe's step count
    assert sweep.main(base + ["--budget_hours", "0.05"]) == 2
    assert "from an earlier 20-step probe run" in capsys.readouterr().out and len(calls(tmp_path)) == 2
    assert sweep.main(["--grid", "lr=0.01", "--train_cmd", f"python {fake.path}", "--gpus", "0",
                         "--budget_hours", "1", "--sweep_name", "c"]) == 0
    out = capsys.readouterr().out
    assert "step time lr=0.01: 50.0 ms/step from a 20-step probe run; 20 steps x 1 run(s)" in out
    assert len(calls(tmp_path)) == 4  # the probe, then the run

    # a probe that logs no step: a clear refusal
    broken = tmp_path / "broken.py"
    broken.write_text("import sys; print('error: unknown flag --val_every'); sys.exit(2)\n")
    assert sweep.main(["--grid", "lr=0.02", "--train_cmd", f"python {broken}", "--gpus", "0",
                         "--budget_hours", "1"]) == 2
    err = capsys.readouterr().err
    assert "the probe run logged no timed step (exit 2" in err and "refusing to start" in err


def test_sweep_results_table_and_rerun(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--grid", "lr=0.01,0.02,0.03", "--seeds", "0,1", "--train_cmd", f"python {fake.path}",
            "--gpus", "0"]
    assert sweep.main(argv) == 0
    assert sorted({c["run_name"] for c in calls(tmp_path)}) == ["lr=0.01", "lr=0.02", "lr=0.03"]
    folders = sorted(p.name for p in (tmp_path / "records" / "track_test").iterdir())
    assert folders == ["2026-11-23_lr=0.01", "2026-11-23_lr=0.02", "2026-11-23_lr=0.03"]
    out = capsys.readouterr().out
    table = out[out.index("results:"):]
    # the fake's loss: law + 0.5 |lr - 0.01| + 1e-4 seed: each cell's std is 1e-4 / sqrt(2)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.startswith("  lr=")}
    assert rows["lr=0.01"][1] == "2/2" and rows["lr=0.01"][5] == "baseline"
    assert rows["lr=0.02"][3:6] == ["+-", "0.0001", "+0.0050"] and float(rows["lr=0.02"][6]) < 1e-3
    assert rows["lr=0.03"][5] == "+0.0100"

    # a rerun trains nothing and prints the same table; --baseline picks the reference cell
    assert sweep.main(argv + ["--baseline", "lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert len(calls(tmp_path)) == 6 and "0 to run" in out
    rows = {line.split()[0]: line.split() for line in out[out.index("results:"):].splitlines() if "lr=0" in line}
    assert rows["lr=0.01"][5] == "-0.0050" and rows["lr=0.02"][5] == "baseline"
    assert sweep.main(argv + ["--baseline", "lr=0.5"]) == 2
    assert "matches 0 cells; name one of: lr=0.01, lr=0.02, lr=0.03" in capsys.readouterr().err


def test_cell_labels_are_safe_folder_names():
    assert sweep.cell_label({"muon_lr": "0.04", "seq_len": "2048"}) == "muon_lr=0.04,seq_len=2048"
    assert sweep.cell_label({}) == "defaults"
    assert sweep.cell_label({"stages": "256:256:1-1:1.0", "x": "a/b c"}) == "stages=256-256-1-1-1.0,x=a-b-c"
    betas = "head=0.5/0.95,embed=0.75/0.95,value_embeds=0.75/0.95,scalars=0.9/0.99"
    long_a = sweep.cell_label({"adam_group_betas": betas, "seq_len": "1024"})
    long_b = sweep.cell_label({"adam_group_betas": betas, "seq_len": "2048"})
    assert len(long_a) == sweep.MAX_RUN_NAME and long_a != long_b and long_a[:60] == long_b[:60]


def test_sweep_spreads_runs_over_gpus(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep.main(["--grid", "lr=0.01,0.02", "--seeds", "0,1", "--gpus", "2",
                         "--train_cmd", f"python {fake.path}", "--", "--cooldown_frac=0.5"]) == 0
    runs = records.load_runs([tmp_path / "records"])
    assert len(runs) == 4 and all(r.hparams["cooldown_frac"] == 0.5 for r in runs)
    devices = {re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", r.environment).group(1) for r in runs}
    assert devices == {"0", "1"}
    assert len({r.folder for r in runs}) == 2  # seeds of one cell share its run name


def test_fit_scaling_law_recovers_exponents():
    E, A, a, B, b = 1.69, 406.4, 0.34, 410.7, 0.28
    N, D = np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e8, 1e10, 5))
    N, D = N.ravel(), D.ravel()
    L = E + A / N ** a + B / D ** b
    fit = sweep.fit_scaling_law(N, D, L)
    for key, true in (("E", E), ("a", a), ("b", b), ("A", A), ("B", B)):
        assert fit[key] == pytest.approx(true, rel=0.01), key
    noisy = L + np.random.default_rng(0).normal(0, 2e-3, L.shape)
    fit = sweep.fit_scaling_law(N, D, noisy)
    assert fit["a"] == pytest.approx(a, rel=0.1) and fit["b"] == pytest.approx(b, rel=0.1)
    assert fit["E"] == pytest.approx(E, rel=0.1) and fit["n"] == 25


def test_sweep_fit_end_to_end(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--grid", "model_dim=32,128,512", "--grid", "num_iterations=10,40,160",
                         "--train_cmd", f"python {fake.path}", "--gpus", "0", "--fit",
                         "--sweep_name", "scaling"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"fit over 9 runs: L\(N, D\) = (\S+) \+ \S+ / N\^(\S+) \+ \S+ / D\^(\S+)", out)
    assert m, out[-2000:]
    E, a, b = map(float, m.groups())
    assert a == pytest.approx(fake.LAW["a"], rel=0.1) and b == pytest.approx(fake.LAW["b"], rel=0.1)
    assert E == pytest.approx(fake.LAW["E"], rel=0.1)
    assert (tmp_path / "records" / "sweeps" / "scaling_fit.png").stat().st_size > 0


# -----------------------------------------------------------------------------
# faults: Ctrl-C, a failed probe


# A stand-in for train_gpt.py in sweeps: logs its flags to calls.log, prints a step line, then (while the file
# `block` exists) waits for a signal; SIGINT ends it as train_gpt.py does (an interrupted summary, exit 130).
SLOW_TRAIN = r'''
import json, signal, sys, time
from pathlib import Path
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(a[0]))
with open("calls.log", "a") as f:
    f.write(json.dumps(flags) + "\n")
print("step:1/2 train_time:10ms step_avg:10.00ms", flush=True)
deadline = time.time() + 60
while Path("block").exists() and not stop and time.time() < deadline:
    time.sleep(0.02)
if stop:
    print("status: interrupted at step 1")
    print("summary: " + json.dumps({"status": "interrupted", "steps": 1}), flush=True)
    sys.exit(130)
print("step:2/2 val_loss:3.5000 train_time:20ms step_avg:10.00ms")
print("summary: " + json.dumps({"status": "ok", "final_val_loss": 3.5, "tokens": 1024, "steps": 2}), flush=True)
'''


def test_one_ctrl_c_stops_the_whole_sweep_and_a_rerun_resumes(tmp_path):
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    (tmp_path / "block").touch()
    argv = [str(ROOT / "tools" / "sweep.py"), "--grid", "lr=0.01,0.02,0.03", "--train_cmd",
            f"{sys.executable} {script}", "--records_dir", "records", "--sweep_name", "s", "--gpus", "0"]
    # its own process group, signalled as a whole, as a terminal's Ctrl-C is
    sweep = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    calls = tmp_path / "calls.log"
    deadline = time.time() + 60
    while not (calls.exists() and calls.read_text().count("\n") == 1) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGINT)  # the run set its handler before logging its call
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    assert calls.read_text().count("\n") == 1  # the next cells never started
    state = json.loads((tmp_path / "records" / "sweeps" / "s.json").read_text())
    assert {k: v["status"] for k, v in state["runs"].items()} == {"s.lr=0.01_seed0": "interrupted"}
    assert "1 interrupted (s.lr=0.01_seed0), 2 not started; rerun the same command" in err

    (tmp_path / "block").unlink()  # the rerun retries the interrupted cell, then runs the rest
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["lr"] for line in calls.read_text().splitlines()] == ["0.01", "0.01", "0.02", "0.03"]
    state = json.loads((tmp_path / "records" / "sweeps" / "s.json").read_text())
    assert {v["status"] for v in state["runs"].values()} == {"ok"} and len(state["runs"]) == 3


def test_a_failed_probe_says_why(tmp_path, monkeypatch, capsys):
    """The README's sweep line without train shards: the probe's own error line is the reason given, and the
    other cells are not probed."""
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "no_shards.py"
    broken.write_text("import sys\nwith open('calls.log', 'a') as f: f.write('x\\n')\n"
                      "print(\"error: no train shards match 'data/fineweb10B/fineweb_train_*.bin'.\")\n"
                      "print('  FineWeb:    python data/cached_fineweb10B.py 9')\nsys.exit(1)\n")
    rc = sweep.main(["--grid", "muon_lr=0.04,0.05", "--seeds", "0,1", "--budget_hours", "2",
                       "--train_cmd", f"python {broken}", "--gpus", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    line = assert_one_error_line(err, "refusing to start", "muon_lr=0.04", "no train shards match",
                                 "probes/muon_lr=0.04.log")
    assert "no step count" not in err and "set --num_iterations" not in line
    assert (tmp_path / "calls.log").read_text() == "x\n"  # one probe, not one per cell
