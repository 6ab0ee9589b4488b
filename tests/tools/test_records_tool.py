import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import records

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for train_gpt.py, written to tmp_path by the `fake` fixture: `render_record` produces the record format
# train_gpt.py writes, and running the script writes one record under ./records/ and prints the summary line last.
# Its final loss follows a known scaling law L(N, D) = E + A/N^a + B/D^b (N = 12 * num_layers * model_dim^2,
# D = num_iterations * 8 * seq_len), plus small offsets for lr and seed.
FAKE_TRAIN = r'''
import json, os, sys, uuid
from pathlib import Path

RULE = "=" * 20
DEFAULTS = {"num_iterations": 20, "cooldown_frac": 0.4, "seq_len": 64, "val_tokens": 1024, "val_every": 5,
            "seed": 0, "track": "track_test", "run_name": "run", "preset": None, "records_dir": "records",
            "num_layers": 2, "model_dim": 64, "num_heads": 2, "lr": 0.01}
LAW = {"E": 1.8, "A": 50.0, "a": 0.34, "B": 20.0, "b": 0.28}


def render_record(hparams, flags, final_loss, ms_per_step=50.0, status="ok", stop_at=None, reason="nan loss",
                  device="NVIDIA H100 80GB HBM3", world_size=8, record="", environment="", tokens_per_step=True):
    """Record text for one run: ok, failed (NaN at stop_at), or incomplete (killed after stop_at steps)."""
    T, tps = hparams["num_iterations"], 8 * hparams["seq_len"]
    hp = dict(hparams, **({"tokens_per_step": tps} if tokens_per_step else {}))
    last = T if stop_at is None else stop_at
    loss = lambda s: final_loss + (10.8 - final_loss) * (1 - s / T) ** 3
    lines = [f"{RULE} train_gpt.py {RULE}", "print('training')", "HEADER_LIKE = (", f"'{RULE} log {RULE}'",
             "'step:3/3 val_loss:0.1 train_time:1ms step_avg:1.00ms')",
             f"{RULE} kernels.py {RULE}", "# kernels", f"{RULE} environment {RULE}", "python 3.11 torch 2.13",
             environment, f"{RULE} hyperparameters {RULE}", "hparams: " + json.dumps(hp), "flags: " + json.dumps(flags),
             f"{RULE} log {RULE}", f"step:0/{T} val_loss:10.8000 train_time:0ms step_avg:nanms"]
    for s in range(1, last + 1):
        t = s * ms_per_step
        lines.append(f"step:{s}/{T} train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms")
        if s % hparams["val_every"] == 0 or s == T:
            val = "nan" if status == "failed" and s == last else f"{loss(s):.4f}"
            lines.append(f"step:{s}/{T} val_loss:{val} train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms")
    if status == "incomplete":
        return "\n".join(lines) + f"\nstep:{last + 1}/{T} train_ti"  # killed mid-line
    lines.append("peak memory allocated: 29900 MiB reserved: 30500 MiB")
    summary = {"status": status, "final_val_loss": final_loss, "train_time_ms": last * ms_per_step,
               "step_avg_ms": ms_per_step, "steps": last, "tokens": last * tps, "tokens_per_step": tps,
               "world_size": world_size, "device": device, "track": hparams["track"],
               "run_name": hparams["run_name"], "date": "2026-11-23", "seed": hparams["seed"], "flags": flags,
               "git_commit": None, "record": record}
    if status == "failed":
        lines.append(f"status: failed reason: {reason}")
        summary.update(final_val_loss=None, reason=reason)
    return "\n".join(lines + ["summary: " + json.dumps(summary)]) + "\n"


def law_loss(hp):
    N = 12 * hp["num_layers"] * hp["model_dim"] ** 2
    D = hp["num_iterations"] * 8 * hp["seq_len"]
    return LAW["E"] + LAW["A"] / N ** LAW["a"] + LAW["B"] / D ** LAW["b"]


def main(argv):
    overrides = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    hp = dict(DEFAULTS)
    for k, v in overrides.items():
        hp[k] = type(DEFAULTS[k])(v) if DEFAULTS.get(k) is not None else v
    flags = {k: v for k, v in hp.items() if v != DEFAULTS.get(k)}
    with open("calls.log", "a") as f:
        f.write(json.dumps(overrides) + "\n")
    folder = Path(hp["records_dir"]) / hp["track"] / f"2026-11-23_{hp['run_name']}"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{uuid.uuid4()}.txt"
    env = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
    matches = lambda spec: spec and all(overrides.get(k) == v for k, v in (c.split("=") for c in spec.split(",")))
    marker = Path(f".failed_once_{hp['run_name']}_{hp['seed']}")
    if matches(os.environ.get("FAKE_CRASH_ONCE")) and not marker.exists():
        # like train_gpt.py on an exception: a status line and a short summary without final_val_loss
        marker.touch()
        short = {"status": "failed", "reason": "RuntimeError('simulated crash')"}
        text = render_record(hp, flags, 3.3, status="incomplete", stop_at=7, environment=env)
        tail = "\nstatus: failed reason: RuntimeError: simulated crash\nsummary: " + json.dumps(short)
        record.write_text(text + tail)
        print("step:7/20 train_time:350ms step_avg:50.00ms")
        print("summary: " + json.dumps(dict(short, record=str(record))))
        return 1
    final = law_loss(hp) + 0.5 * abs(hp["lr"] - 0.01) + 1e-4 * hp["seed"]
    diverged = matches(os.environ.get("FAKE_DIVERGE"))
    text = render_record(hp, flags, final, record=str(record), environment=env,
                         status="failed" if diverged else "ok", stop_at=10 if diverged else None)
    record.write_text(text)
    lines = text.splitlines()
    print("\n".join(lines[len(lines) - lines[::-1].index(f"{RULE} log {RULE}"):]))  # the log, as train_gpt.py
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

HP = {"num_iterations": 20, "cooldown_frac": 0.4, "seq_len": 64, "val_tokens": 1024, "val_every": 5, "seed": 0,
      "track": "track_1_short", "run_name": "baseline", "preset": None, "num_layers": 2, "model_dim": 64,
      "num_heads": 2, "lr": 0.01}


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    spec = importlib.util.spec_from_file_location("fake_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def write_run(fake, root, track, folder, final, seed=0, name=None, flags=None, **kw):
    flags = dict(flags or {})
    hp = dict(HP, track=track, run_name=folder[11:], seed=seed, **flags)
    path = Path(root) / track / folder / (name or f"{seed:08d}-0000-0000-0000-000000000000.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fake.render_record(hp, dict(flags, seed=seed, run_name=hp["run_name"]), final, **kw))
    return path


def t_cdf_df2(t):
    """Student t CDF with 2 degrees of freedom, in closed form."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


# -----------------------------------------------------------------------------
# Parsing


def test_parse_ok_failed_incomplete(fake, tmp_path):
    ok = records.parse_record(write_run(fake, tmp_path, "track_1_short", "2026-11-20_baseline", 3.2712))
    assert (ok.status, ok.track, ok.date, ok.run_name) == ("ok", "track_1_short", "2026-11-20", "baseline")
    assert ok.final_val_loss == 3.2712 and ok.num_steps == 20 and ok.tokens == 20 * 512
    assert ok.hparams["cooldown_frac"] == 0.4 and ok.peak_memory_mib == 29900
    # the header-like lines inside the source section are not mistaken for the log
    assert [p[0] for p in ok.val_points] == [0, 5, 10, 15, 20]
    assert ok.val_points[-1] == (20, 20 * 512, 1000.0, 3.2712)

    failed = records.parse_record(
        write_run(fake, tmp_path, "track_1_short", "2026-11-20_baseline", 3.3, seed=1, status="failed", stop_at=10))
    assert failed.status == "failed" and failed.reason == "nan loss" and failed.final_val_loss is None

    inc = records.parse_record(write_run(fake, tmp_path, "track_1_short", "2026-11-20_baseline", 3.3, seed=2,
                                         status="incomplete", stop_at=12, tokens_per_step=False))
    assert inc.status == "incomplete" and inc.summary is None
    assert inc.num_steps == 12 and inc.train_time_ms == 600  # the cut-off step 13 line is ignored
    assert inc.tokens_per_step == 8 * 64 and inc.tokens == 12 * 512
    assert inc.final_val_loss == pytest.approx(3.3 + 7.5 * (1 - 10 / 20) ** 3, abs=1e-4)  # last val point


# -----------------------------------------------------------------------------
# table


def make_records_tree(fake, root):
    base = "2026-11-20_baseline"
    for seed, loss in enumerate([3.270, 3.274, 3.272]):
        write_run(fake, root, "track_1_short", base, loss, seed=seed)
    write_run(fake, root, "track_1_short", base, 3.3, seed=3, status="failed", stop_at=10)
    write_run(fake, root, "track_1_short", base, 3.3, seed=4, status="incomplete", stop_at=12)
    for seed, loss in enumerate([3.29, 3.30]):
        write_run(fake, root, "track_1_short", "2026-11-22_short_cooldown", loss, seed=seed,
                  flags={"cooldown_frac": 0.5}, ms_per_step=40.0)
    write_run(fake, root, "track_2_medium", "2026-11-21_big", 3.3, status="incomplete", stop_at=7,
              tokens_per_step=False, device="NVIDIA A100-SXM4-80GB")
    write_run(fake, root, "local", "2026-11-23_smoke", 4.0)
    (root / "kernels").mkdir()
    (root / "kernels" / "bench.jsonl").write_text('{"kernel": "x", "ms": 1.0}\n')
    (root / "kernels" / "bench.txt").write_text("not a run\n")


def test_table_rows(fake, tmp_path, capsys):
    root = tmp_path / "records"
    make_records_tree(fake, root)
    (root / "notes.txt").write_text("stray notes\n")
    runs = records.load_runs([root], records.NON_RUN_DIRS + ("local",))
    assert "skipping" in capsys.readouterr().err  # the stray file is reported, not silently dropped
    rows = records.table_rows(runs, 3.28)
    assert [(r["track"], r["date"], r["run name"]) for r in rows] == [
        ("track_1_short", "2026-11-20", "baseline"), ("track_1_short", "2026-11-22", "short_cooldown"),
        ("track_2_medium", "2026-11-21", "big")]
    base, short, big = rows
    t = (3.272 - 3.28) / (0.002 / math.sqrt(3))
    assert base == {
        "track": "track_1_short", "date": "2026-11-20", "run name": "baseline",
        "runs": "3/5 (1 failed, 1 incomplete)", "mean val loss": "3.2720", "std": "0.0020",
        "p(<3.28)": f"{t_cdf_df2(t):.3f}", "time (s)": "1.0", "ms/step": "50.00", "steps": "20", "tokens": "10240",
        "world size": "8", "GPU": "H100 80GB HBM3", "flags": ""}
    assert base["p(<3.28)"] == "0.010"
    assert (short["runs"], short["mean val loss"], short["ms/step"], short["flags"]) == (
        "2/2", "3.2950", "40.00", "cooldown_frac=0.5")
    assert (big["runs"], big["mean val loss"], big["std"], big["p(<3.28)"]) == (
        "0/1 (1 incomplete)", "–", "–", "–")
    assert (big["steps"], big["tokens"], big["time (s)"]) == ("7", "3584", "0.3")


def test_table_rewrites_only_between_markers(fake, tmp_path, capsys):
    root = tmp_path / "records"
    make_records_tree(fake, root)
    before = "# Records\r\n\nIntro — with non-ASCII and CRLF.\r\n\n"
    after = "\n## After\n\ntext that must survive\r\n"
    readme = root / "README.md"
    readme.write_bytes((before + records.TABLE_START + "\nold table\n" + records.TABLE_END + after).encode())
    assert records.main(["table", "--records_dir", str(root)]) == 0  # prints only
    assert "old table" in readme.read_text()
    assert records.main(["table", "--records_dir", str(root), "--write"]) == 0
    data = readme.read_bytes().decode()
    assert data.startswith(before + records.TABLE_START + "\n") and data.endswith(records.TABLE_END + after)
    inner = data[len(before) + len(records.TABLE_START):-len(records.TABLE_END + after)]
    lines = inner.strip("\n").splitlines()
    assert lines[0].startswith("| track | date | run name | runs |") and len(lines) == 2 + 3
    assert "| 3/5 (1 failed, 1 incomplete) |" in inner and "smoke" not in inner and "old table" not in inner
    assert "| 3/5 (1 failed, 1 incomplete) |" in capsys.readouterr().out

    # --include_local: the local (CPU) runs go to the git-ignored records/local/README.md, created with its markers;
    # the tracked README is rewritten exactly as without the flag (issue 22: local runs never land in it)
    written = readme.read_bytes()
    assert records.main(["table", "--records_dir", str(root), "--include_local", "--write"]) == 0
    assert "| local | 2026-11-23 | smoke | 1/1 |" in capsys.readouterr().out  # printed with the others
    assert readme.read_bytes() == written
    local = (root / "local" / "README.md").read_text()
    assert local.count(records.TABLE_START) == 1 and "| local | 2026-11-23 | smoke | 1/1 |" in local
    assert "baseline" not in local
    (root / "local" / "README.md").write_text(f"# mine\n{records.TABLE_START}\nold\n{records.TABLE_END}\nkept\n")
    assert records.main(["table", "--records_dir", str(root), "--include_local", "--write"]) == 0
    local = (root / "local" / "README.md").read_text()
    assert local.startswith("# mine\n") and local.endswith("kept\n") and "old" not in local and "smoke" in local
    assert readme.read_bytes() == written

    readme.write_text("# no markers here\n")
    assert records.main(["table", "--records_dir", str(root), "--write"]) == 1
    assert "records-table:start" in capsys.readouterr().err
    assert readme.read_text() == "# no markers here\n"


def test_repo_readme_has_markers():
    text = (ROOT / "records" / "README.md").read_text()
    assert text.count(records.TABLE_START) == 1 and text.count(records.TABLE_END) == 1
    assert text.index(records.TABLE_START) < text.index(records.TABLE_END)


# -----------------------------------------------------------------------------
# stats


def test_one_sample_test_by_hand():
    x = [3.270, 3.274, 3.272]
    res = records.one_sample_test(x, target=3.28, alpha=0.01)
    mean, s = 3.272, 0.002  # sum of squared deviations 8e-6 over n - 1 = 2
    t = (mean - 3.28) / (s / math.sqrt(3))
    assert res.n == 3 and res.df == 2
    assert res.mean == pytest.approx(mean) and res.std == pytest.approx(s)
    assert res.t == pytest.approx(t) and res.p == pytest.approx(t_cdf_df2(t), rel=1e-9)
    assert res.p == pytest.approx(0.0101, abs=1e-4) and not res.significant
    assert records.one_sample_test(x, 3.28, alpha=0.05).significant
    # 97.5% quantile of t with 2 df: q / sqrt(2 + q^2) = 0.95  =>  q^2 = 2 * 0.9025 / 0.0975
    q = math.sqrt(2 * 0.9025 / 0.0975)
    half = q * s / math.sqrt(3)
    assert res.ci == pytest.approx((mean - half, mean + half))


def test_welch_by_hand_and_symmetric():
    a, b = [3.270, 3.276], [3.280, 3.286]  # equal n = 2 and equal variances: Welch df is exactly 2
    w = records.welch_test(a, b)
    se = math.sqrt(1.8e-5 / 2 + 1.8e-5 / 2)
    t = -0.010 / se
    assert w.diff == pytest.approx(-0.010) and w.df == pytest.approx(2.0)
    assert w.t == pytest.approx(t) and w.p == pytest.approx(2 * (1 - t_cdf_df2(abs(t))), rel=1e-9)

    a, b = [3.271, 3.275, 3.279, 3.272], [3.281, 3.279, 3.290]
    ab, ba = records.welch_test(a, b), records.welch_test(b, a)
    assert ab.diff == pytest.approx(-ba.diff) and ab.t == pytest.approx(-ba.t)
    assert ab.p == pytest.approx(ba.p) and ab.df == pytest.approx(ba.df)
    assert ab.ci == pytest.approx((-ba.ci[1], -ba.ci[0]))


def test_stats_cli(fake, tmp_path, capsys):
    root = tmp_path / "records"
    make_records_tree(fake, root)
    assert records.main(["stats", str(root / "track_1_short" / "2026-11-20_baseline")]) == 0
    out = capsys.readouterr().out
    assert "5 runs, 3 ok (excluded: 1 failed, 1 incomplete)" in out
    assert "n=3" in out and "NOT significant" in out
    assert records.main(["stats", str(root / "track_1_short" / "2026-11-20_baseline"), "--alpha", "0.05",
                         "--vs", str(root / "track_1_short" / "2026-11-22_short_cooldown")]) == 0
    out = capsys.readouterr().out
    assert "verdict at alpha=0.05: significant" in out and "Welch t-test, mean(A) - mean(B) = -0.02300" in out


# -----------------------------------------------------------------------------
# compare


def test_compare_plot_and_confound_warning(fake, tmp_path, capsys):
    root = tmp_path / "records" / "track_1_short"
    for seed in (0, 1):
        write_run(fake, root.parent, root.name, "2026-11-20_base", 3.27 + 0.002 * seed, seed=seed)
        write_run(fake, root.parent, root.name, "2026-11-21_cd05", 3.26 + 0.002 * seed, seed=seed,
                  flags={"cooldown_frac": 0.5}, ms_per_step=45.0)
        write_run(fake, root.parent, root.name, "2026-11-22_reseed", 3.27 + 0.002 * seed, seed=seed + 2)
    out = tmp_path / "cmp.png"
    args = ["compare", str(root / "2026-11-20_base"), str(root / "2026-11-21_cd05"), "--out", str(out)]
    assert records.main(args) == 0
    captured = capsys.readouterr()
    assert re.search(r"WARNING.*cooldown_frac.*2026-11-20_base=0\.4.*2026-11-21_cd05=0\.5", captured.err)
    assert "seed" not in captured.err
    assert out.stat().st_size > 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val loss at equal tokens" in captured.out and "val loss at equal time" in captured.out
    assert "(-0.0100)" in captured.out  # equal tokens, final point: 3.261 vs 3.271
    assert "reaches 3.28 at" in captured.out

    assert records.main(args + ["--subject", "cooldown_frac", "--labels", "base,cd"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert records.main(["compare", str(root / "2026-11-20_base"), str(root / "2026-11-22_reseed"),
                         "--out", str(out), "--zoom", "1", "--band", "std"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_compare_figure_zoom_limits_and_warning(fake, tmp_path, capsys):
    root = tmp_path / "records"
    track = "track_1_short"
    for seed in (0, 1):  # same experiment; only bookkeeping differs (checkpoint paths, save_every, val_every)
        write_run(fake, root, track, "2026-11-20_slow", 3.27 + 0.002 * seed, seed=seed,
                  flags={"init_from": f"slow{seed}.pt", "save_every": 10})
        write_run(fake, root, track, "2026-11-21_fast", 3.29 + 0.002 * seed, seed=seed, ms_per_step=30.0,
                  flags={"init_from": f"fast{seed}.pt", "resume": "", "val_every": 4 + seed})
    out = tmp_path / "cmp.png"
    assert records.main(["compare", str(root / track / "2026-11-20_slow"), str(root / track / "2026-11-21_fast"),
                         "--out", str(out), "--labels", "slow,fast"]) == 0
    captured = capsys.readouterr()
    assert "differ in hyperparameters" not in captured.err  # bookkeeping is not a confound
    # fast ends at 0.6 s, before the last 30% of the time axis (0.7 s to 1 s): said, and the window widens
    assert "WARNING: fast has no validation point in the last 30% of the time axis (it ends at 0.6 s" in captured.err
    assert "validated at different steps" in captured.err  # fast's val_every 4 and 5: an interpolated mean

    slow = records.load_runs([root / track / "2026-11-20_slow"])
    fast = records.load_runs([root / track / "2026-11-21_fast"])
    curves = {axis: [records.group_curve(slow, axis), records.group_curve(fast, axis)] for axis in ("tokens", "time")}
    c = curves["tokens"][0]
    assert not c.interpolated and list(c.x) == [0, 2560, 5120, 7680, 10240]  # the validation steps, nothing between
    assert [list(x) for x, _ in c.runs] == [list(c.x)] * 2 and c.mean[-1] == pytest.approx(3.271)
    assert curves["tokens"][1].interpolated and list(curves["tokens"][1].x) == [
        0, 2048, 2560, 4096, 5120, 6144, 7680, 8192, 10240]
    drawn = records.plot_compare(curves, ["slow", "fast"], tmp_path / "c2.png", 0.3, "minmax", 3.28, [2, 2])
    (x_lo, x_hi), (y_lo, y_hi) = drawn["zoom"]["tokens"]
    assert x_lo == pytest.approx(0.7 * 10240 - 0.02 * 0.3 * 10240) and x_hi > 10240
    # y from the curves in the window: the final losses (3.27-3.292) up to where the lines enter it (about 3.56 at
    # x_lo), not the 10.8 of step 0
    assert 3.2 < y_lo < 3.27 and 3.5 < y_hi < 3.7
    (x_lo, _), _ = drawn["zoom"]["time"]
    assert x_lo < 0.48  # widened to fast's last two points (steps 16 and 20 of its mean: 0.48 s and 0.6 s)
    assert drawn["full"]["tokens"][1] < 8  # from the points after the first 5% of x (step 4: 7.1), not 10.8


def test_bookkeeping_is_not_a_confound(fake, tmp_path):
    root = tmp_path / "records"
    a = [records.parse_record(write_run(fake, root, "t", "2026-11-20_a", 3.27,
                                        flags={"init_from": "x.pt", "save_every": 5, "val_every": 4}))]
    b = [records.parse_record(write_run(fake, root, "t", "2026-11-20_b", 3.27,
                                        flags={"init_from": "y.pt", "resume": "r_step5.pt", "records_dir": "u"}))]
    c = [records.parse_record(write_run(fake, root, "t", "2026-11-20_c", 3.27, flags={"val_tokens": 2048}))]
    assert records.hparam_differences([a, b]) == []
    assert records.hparam_differences([a, c]) == [("init_from", ["<a checkpoint>", "<missing>"]),
                                                  ("val_tokens", ["1024.0", "2048.0"])]


# -----------------------------------------------------------------------------
# sweep: moved to tools/sweep.py (tests/tools/test_sweep.py); the old command line forwards there


def test_records_py_sweep_forwards_to_tools_sweep(tmp_path, monkeypatch, capsys):
    """`records.py sweep ...`, the sweep's old command line, names tools/sweep.py on stderr and runs it there
    (tests/tools/test_sweep.py tests the sweep itself)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--grid", "lr=0.01,0.02", "--ms_per_step", "100", "--gpus", "0", "--dry_run", "--",
            "--num_iterations=10"]
    assert records.main(["sweep", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"records.py sweep moved to tools/sweep.py: python tools/sweep.py {' '.join(argv)}\n"
    assert "time estimate: 0.00 h" in captured.out and captured.out.count("--num_iterations=10 ") == 2
    # as a script, with the sweep's own refusal and exit code
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "records.py"), "sweep", "--grid", "lr=0.01",
                        "--probe_steps", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "records.py sweep moved to tools/sweep.py: python tools/sweep.py --grid lr=0.01 --probe_steps 0",
        "error: --probe_steps 0 must be >= 1"], r.stderr
    assert not (tmp_path / "records").exists()


# -----------------------------------------------------------------------------
# resumed runs


def write_segment(root, folder, name, hp, start, stop, resumed_from=None, status="ok", final=3.27, ms=50.0,
                  checkpoint=None):
    """A record like train_gpt.py writes for the steps start..stop of a run: resumed (a "resumed from" line and
    resumed_from in the summary) when resumed_from is given; status ok (stop is the last step), interrupted (a
    signal after step `stop`, checkpoint written) or incomplete (killed after step `stop`: no summary)."""
    rule, T, every = "=" * 20, hp["num_iterations"], hp["val_every"]
    hp = dict(hp, resume=resumed_from or "")
    loss = lambda s: final + (10.8 - final) * (1 - s / T) ** 3
    path = Path(root) / hp["track"] / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = {"seed": hp["seed"], **({"resume": resumed_from} if resumed_from else {})}
    lines = [f"{rule} train_gpt.py {rule}", "# source", f"{rule} environment {rule}", "torch 2.13",
             f"{rule} hyperparameters {rule}", "hparams: " + json.dumps(hp), "flags: " + json.dumps(flags),
             f"{rule} log {rule}"]
    if resumed_from:
        lines.append(f"resumed from {resumed_from} at step {start} (train_time {start * ms:.0f}ms so far)")
    for s in range(start, stop):
        if s % every == 0:
            lines.append(f"step:{s}/{T} val_loss:{loss(s):.4f} train_time:{s * ms:.0f}ms step_avg:{ms:.2f}ms")
        lines.append(f"step:{s + 1}/{T} train_time:{(s + 1) * ms:.0f}ms step_avg:{ms:.2f}ms")
    base = {"record": str(path), "resumed_from": resumed_from}
    if status == "ok":
        lines.append(f"step:{T}/{T} val_loss:{final:.4f} train_time:{T * ms:.0f}ms step_avg:{ms:.2f}ms")
        lines.append("summary: " + json.dumps(dict(base, status="ok", final_val_loss=final, train_time_ms=T * ms,
                                                   step_avg_ms=ms, steps=T, tokens=T * 512, tokens_per_step=512,
                                                   world_size=1, device="NVIDIA H100 80GB HBM3", seed=hp["seed"])))
    elif status == "interrupted":
        lines.append(f"status: interrupted at step {stop}; resume: --resume={checkpoint}")
        lines.append("summary: " + json.dumps(dict(base, status="interrupted", steps=stop, checkpoint=checkpoint)))
    path.write_text("\n".join(lines) + "\n")
    return path


RESUME_HP = dict(HP, num_iterations=20, val_every=5, seed=0)


def resumed_pair(root, cut=12, parent_status="interrupted", parent_stop=None, child_folder="2026-11-21_baseline"):
    """A run interrupted at step `cut` on 2026-11-20 and resumed from its checkpoint on another day."""
    parent_name = "aaaaaaaa-0000-0000-0000-000000000000"
    ckpt_kind = f"step{cut}_interrupted" if parent_status == "interrupted" else f"step{cut}"
    ckpt = str(Path(root) / "track_1_short" / "2026-11-20_baseline" / f"{parent_name}_{ckpt_kind}.pt")
    parent = write_segment(root, "2026-11-20_baseline", parent_name + ".txt", RESUME_HP, 0, parent_stop or cut,
                           status=parent_status, checkpoint=ckpt)
    child = write_segment(root, child_folder, "bbbbbbbb-0000-0000-0000-000000000000.txt", RESUME_HP, cut, 20,
                          resumed_from=ckpt, final=3.27)
    return parent, child


def test_resumed_segments_join_into_one_run(tmp_path, capsys):
    root = tmp_path / "records"
    parent, child = resumed_pair(root)
    other = write_segment(root, "2026-11-20_baseline", "cccccccc-0000-0000-0000-000000000000.txt",
                          dict(RESUME_HP, seed=1), 0, 20, final=3.29)
    runs = records.load_runs([root])
    assert len(runs) == 2
    joined = next(r for r in runs if r.seed == 0)
    assert joined.path == parent and joined.record_files == (parent, child) and joined.status == "ok"
    assert joined.final_val_loss == 3.27 and joined.train_time_ms == 1000 and joined.num_steps == 20
    assert [p[0] for p in joined.val_points] == [0, 5, 10, 15, 20]
    steps = [s["step"] for s in joined.steps if "val_loss" not in s]
    assert steps == list(range(1, 21))  # every train step once: the parent's up to 12, then the child's
    assert joined.folder == "2026-11-20_baseline"

    rows = records.table_rows(runs)
    assert [(r["date"], r["runs"], r["mean val loss"]) for r in rows] == [("2026-11-20", "2/2", "3.2800")]
    # given one folder, the segment in the other folder is found on disk, both ways
    assert [r.record_files for r in records.load_runs([parent.parent]) if r.seed == 0] == [(parent, child)]
    assert [r.record_files for r in records.load_runs([child.parent])] == [(parent, child)]
    assert records.main(["stats", str(parent.parent)]) == 0
    assert "2 runs, 2 ok" in capsys.readouterr().out

    # compare draws the whole joined curve: from step 0 to the child's last step
    curve = records.group_curve([joined], "tokens")
    assert curve.x[0] == 0 and curve.x[-1] == 20 * 512 and len(curve.x) == 5
    assert other.exists()


def test_resume_from_a_periodic_checkpoint_drops_the_replayed_steps(tmp_path):
    root = tmp_path / "records"
    # checkpoint at step 10 (a validation step), the parent went on to step 13 and was killed
    parent, child = resumed_pair(root, cut=10, parent_status="incomplete", parent_stop=13)
    (run,) = records.load_runs([root])
    assert run.record_files == (parent, child) and run.status == "ok"
    assert [p[0] for p in run.val_points] == [0, 5, 10, 15, 20]  # step 10's validation once
    assert [s["step"] for s in run.steps if "val_loss" not in s] == list(range(1, 21))


def test_unresumed_interrupt_and_missing_parent(tmp_path, capsys):
    root = tmp_path / "records"
    parent, child = resumed_pair(root)
    child.unlink()
    (run,) = records.load_runs([root])
    assert run.status == "interrupted" and run.final_val_loss is None
    assert records.table_rows([run])[0]["runs"] == "0/1 (1 interrupted)"

    root2 = tmp_path / "other"
    parent, child = resumed_pair(root2)
    parent.unlink()
    (run,) = records.load_runs([root2])
    assert run.record_files == (child,) and run.status == "ok"
    assert "whose record was not found" in capsys.readouterr().err


def failed_resume(root, folder, name, parent, ckpt_kind, logged_resume):
    """The record of a --resume that died before its first step (a shape mismatch on loading): the resume flag, no
    step line, a failed status and a short summary; with logged_resume, the "resumed from" line came first."""
    ckpt = str(parent.with_name(f"{parent.stem}_{ckpt_kind}.pt"))
    cut = 20 if ckpt_kind == "final" else int(ckpt_kind.removeprefix("step"))
    path = write_segment(root, folder, name, RESUME_HP, cut, cut, resumed_from=ckpt, status="incomplete")
    text = path.read_text()
    if not logged_resume:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("resumed from")) + "\n"
    reason = "RuntimeError: Error(s) in loading state_dict for GPT: size mismatch for embed.weight"
    path.write_text(text + f"status: failed reason: {reason}\n"
                    + "summary: " + json.dumps({"status": "failed", "reason": reason, "record": str(path)}) + "\n")
    return path


@pytest.mark.parametrize("ckpt_kind,logged_resume", [("final", False), ("step10", True), ("step10", False)])
def test_a_resume_that_never_trained_never_demotes_its_parent(tmp_path, capsys, ckpt_kind, logged_resume):
    """Issue 22: a finished run plus a failed --resume of its checkpoint counts as the finished run alone."""
    root = tmp_path / "records"
    folder = root / "track_1_short" / "2026-11-20_baseline"
    parent = write_segment(root, folder.name, "aaaaaaaa-0000-0000-0000-000000000000.txt", RESUME_HP, 0, 20,
                           final=3.27)
    write_segment(root, folder.name, "cccccccc-0000-0000-0000-000000000000.txt", dict(RESUME_HP, seed=1), 0, 20,
                  final=3.275)

    def outcome():
        runs = records.load_runs([folder])
        assert records.main(["stats", str(folder)]) == 0
        captured = capsys.readouterr()
        return ([(r.path, r.record_files, r.status, r.final_val_loss, r.num_steps, len(r.steps)) for r in runs],
                captured.out, captured.err)

    alone, alone_out, _ = outcome()
    assert "2 runs, 2 ok" in alone_out and "n=2" in alone_out
    # the failed resume writes its record on the next day, into a folder of its own (found from the parent's too)
    child = failed_resume(root, "2026-11-21_baseline", "bbbbbbbb-0000-0000-0000-000000000000.txt", parent,
                          ckpt_kind, logged_resume)
    assert records.parse_record(child).resumed_from.endswith(f"aaaaaaaa-0000-0000-0000-000000000000_{ckpt_kind}.pt")
    joined, out, err = outcome()
    assert joined == alone and out == alone_out
    assert f"warning: {child} resumed from" in err and "never trained a step (status failed" in err
    other = folder / "cccccccc-0000-0000-0000-000000000000.txt"
    both = {parent: "ok", other: "ok"}
    for given, expected in (([root], both), ([folder, child.parent], both),
                            ([child.parent], {parent: "ok"})):  # the child's folder alone: its parent, from disk
        assert {r.path: (r.status, r.record_files) for r in records.load_runs(given)} == {
            k: (v, (k,)) for k, v in expected.items()}
    assert [r["runs"] for r in records.table_rows(records.load_runs([root]))] == ["2/2"]


def test_an_empty_resume_beside_a_real_one(tmp_path, capsys):
    """An interrupted run resumed twice: the attempt that died on loading is ignored, the one that trained is
    joined, and an interrupted parent with only an empty attempt stays interrupted (not failed)."""
    root = tmp_path / "records"
    parent, good = resumed_pair(root)  # interrupted at 12, resumed to 20
    ckpt_kind = "step12_interrupted"
    empty = failed_resume(root, "2026-11-22_baseline", "dddddddd-0000-0000-0000-000000000000.txt", parent,
                          "step12", False)
    empty.write_text(empty.read_text().replace("_step12.pt", f"_{ckpt_kind}.pt"))
    (run,) = records.load_runs([root])
    assert run.record_files == (parent, good) and run.status == "ok" and run.final_val_loss == 3.27
    assert f"warning: {empty} resumed from" in capsys.readouterr().err
    good.unlink()
    (run,) = records.load_runs([root])
    assert run.record_files == (parent,) and run.status == "interrupted"


def test_a_finished_run_is_not_demoted_by_a_shorter_branch(tmp_path, capsys):
    """A run that finished ok, and a branch resumed from its step-10 checkpoint that trained to step 14 and
    diverged: the finished run counts as it stands."""
    root = tmp_path / "records"
    parent = write_segment(root, "2026-11-20_baseline", "aaaaaaaa-0000-0000-0000-000000000000.txt", RESUME_HP, 0,
                           20, final=3.27)
    ckpt = str(parent.with_name(parent.stem + "_step10.pt"))
    branch = write_segment(root, "2026-11-21_baseline", "bbbbbbbb-0000-0000-0000-000000000000.txt", RESUME_HP, 10,
                           14, resumed_from=ckpt, status="incomplete")
    branch.write_text(branch.read_text() + "status: failed reason: non-finite train loss at step 14\nsummary: "
                      + json.dumps({"status": "failed", "final_val_loss": None, "steps": 14}) + "\n")
    (run,) = records.load_runs([root])
    assert run.record_files == (parent,) and run.status == "ok" and run.final_val_loss == 3.27
    assert f"warning: {branch} continues {parent}, which finished ok, but got less far" in capsys.readouterr().err


def test_duplicate_seed_warning(fake, tmp_path, capsys):
    root = tmp_path / "records"
    base = "2026-11-20_baseline"
    write_run(fake, root, "track_1_short", base, 3.270, seed=0)
    write_run(fake, root, "track_1_short", base, 3.272, seed=1)
    write_run(fake, root, "track_1_short", base, 3.3, seed=1, status="failed", stop_at=10,
              name="failed.txt")  # a failed attempt is not in the statistics: no warning
    assert records.main(["table", "--records_dir", str(root)]) == 0
    assert "warning" not in capsys.readouterr().err
    write_run(fake, root, "track_1_short", base, 3.274, seed=1, name="dup.txt")
    assert records.main(["table", "--records_dir", str(root)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: track_1_short/2026-11-20_baseline: 2 ok runs with seed 1 .*dup\.txt", err), err
    assert "seed 0" not in err
    assert records.main(["stats", str(root / "track_1_short" / base)]) == 0
    assert "group A: 2 ok runs with seed 1" in capsys.readouterr().err
    # the same seed with other flags is another experiment, not a duplicate
    write_run(fake, root, "track_1_short", "2026-11-21_mixed", 3.27, seed=0)
    write_run(fake, root, "track_1_short", "2026-11-21_mixed", 3.26, seed=0, name="lr.txt", flags={"lr": 0.02})
    assert records.duplicate_seeds({"m": records.load_runs([root / "track_1_short" / "2026-11-21_mixed"])}) == []
