"""Run a grid of train_gpt.py flags x seeds, resumably and within a time budget; optionally fit a scaling law.

    python tools/sweep.py --grid name=v1,v2 ... --seeds 0,1 [--budget_hours H] [--fit] [-- extra flags]

Arguments after a lone -- are passed to every run. Each run writes its record as any run does; the sweep's state
(finished runs, step-time probes) is records/sweeps/<sweep_name>.json, so a rerun of the same command retries the
crashed and interrupted runs and runs the rest. It ends with a results table (final val loss per cell, Welch t-test
against a baseline cell) and, with --fit, a fit of L(N, D) = E + A/N^a + B/D^b. Reading and comparing the records
is tools/records.py's job; this tool imports what it needs from there.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: tools/records.py is imported as tools.records
    sys.path.insert(0, str(ROOT))

from tools.records import (LOCAL_DIR, MEASUREMENT_ONLY_KEYS, NON_RUN_DIRS, PER_RUN_KEYS, _SUMMARY,  # noqa: E402
                           _canon, _fmt_p, _parse_step, load_runs, parse_record, welch_test)

# -----------------------------------------------------------------------------
# sweep


def parse_grid(specs):
    """['lr=0.1,0.2', 'wd=0'] -> {'lr': ['0.1', '0.2'], 'wd': ['0']} (values stay strings, passed as given)."""
    grid = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name or not values:
            raise ValueError(f"bad --grid {spec!r}; expected name=v1,v2,...")
        grid[name] = [v.strip() for v in values.split(",")]
    return grid


def parse_flag_args(extra):
    """{'name': 'value'} for the --name=value and --name value arguments of a train_gpt.py command line."""
    flags, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            if not sep:
                has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
                value = extra[i + 1] if has_value else "true"
                i += has_value
            flags[name] = value
        i += 1
    return flags


def cell_hash(cell, extra):
    blob = json.dumps({"flags": cell, "extra": list(extra)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


MAX_RUN_NAME = 80


def cell_label(cell):
    """{'muon_lr': '0.04', 'seq_len': '2048'} -> 'muon_lr=0.04,seq_len=2048' ('defaults' for the empty cell), safe as
    part of a folder name: other characters become '-', and a long label is cut and ends in a hash of the whole."""
    label = ",".join(f"{k}={v}" for k, v in cell.items()) or "defaults"
    safe = re.sub(r"[^A-Za-z0-9._,=+-]", "-", label)
    if len(safe) > MAX_RUN_NAME:
        safe = safe[:MAX_RUN_NAME - 9] + "~" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return safe


def expand_sweep(grid, seeds, prefix=""):
    """Every (cell, seed) as a run dict. All seeds of a cell share its run name (prefix + its label), so they form
    one records group."""
    names = list(grid)
    runs = []
    for values in itertools.product(*(grid[n] for n in names)):
        cell = dict(zip(names, values))
        label = cell_label(cell)
        run_name = prefix + label
        for seed in seeds:
            runs.append({"key": f"{run_name}_seed{seed}", "flags": cell, "seed": seed, "run_name": run_name,
                         "cell": label})
    return runs


def build_command(train_cmd, run, extra, nproc, records_dir=None):
    """The train command of one run. records_dir goes to the run unless the flags after -- set their own."""
    cmd = shlex.split(train_cmd)
    if cmd and cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    if nproc > 1:  # torchrun, run by this interpreter so that it is the same environment's torch
        if cmd and cmd[0] == sys.executable:
            cmd = cmd[1:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd
    where = [f"--records_dir={records_dir}"] if records_dir and "records_dir" not in parse_flag_args(extra) else []
    return (cmd + [f"--{k}={v}" for k, v in run["flags"].items()] + list(extra) + where
            + [f"--run_name={run['run_name']}", f"--seed={run['seed']}"])


def same_config(config, run):
    """Whether run was trained with these command-line flags: each flag matches the run's hyperparameter, and
    every non-default flag of the run (other than per-run ones) is among them. Flags set to their default value
    are absent from a record's flags, hence the comparison against hparams."""
    ignored = PER_RUN_KEYS | MEASUREMENT_ONLY_KEYS
    hp = {**run.flags, **run.hparams}
    return (all(k in hp and _canon(hp[k]) == _canon(v) for k, v in config.items() if k not in ignored)
            and all(k in config for k in run.flags if k not in ignored))


def estimate_run_ms(config, records, ms_per_step=None):
    """(num_iterations, ms/step, where the ms/step came from) for a run with these flags. ms/step: ms_per_step if
    given, else the mean step_avg of the records with the same flags (a diverged or killed run's step_avg is as good
    a timing as any), else None. num_iterations: the flag, else those records' hparams, else the default (from any
    record that sets neither num_iterations nor a preset)."""
    same = [r for r in records if same_config(config, r)]
    source = "--ms_per_step" if ms_per_step is not None else None
    if ms_per_step is None:
        avgs = [r.step_avg_ms for r in same if r.step_avg_ms is not None]
        if avgs:
            ms_per_step = float(np.mean(avgs))
            source = f"the mean step_avg of {len(avgs)} record{'s' if len(avgs) > 1 else ''} with the same flags"
    iters = config.get("num_iterations")
    if iters is None:
        donors = same or [r for r in records if not {"num_iterations", "preset"} & set(r.flags)]
        donors = [r for r in donors if "num_iterations" in r.hparams]
        iters = donors[0].hparams["num_iterations"] if donors else None
    return (None if iters is None else int(float(iters))), ms_per_step, source


def probe_step_time(cmd, steps, log_path, timeout_s):
    """Time a run by starting it: cmd (which validates at step `steps`) runs until that validation, whose
    train_time is synchronized and excludes compile warm-up, then gets SIGTERM (train_gpt.py stops at the next step
    boundary). Returns (ms per step, the run's total steps from its step lines); raises RuntimeError when the run
    ends or times out before it logs a timed step."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    best = None  # the latest step line: (step, total, train_time_ms); the validation at `steps` ends the probe
    said = []  # the run's first "error: ..." line, else its last non-blank line: why it ended early
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1, start_new_session=True) as proc:
        watchdog = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
        watchdog.start()
        try:
            stopping = False
            for line in proc.stdout:  # read to the end even after SIGTERM, so a full pipe never blocks the run
                log.write(line)
                if line.strip() and not (said and said[0].startswith("error:")):
                    said[:] = [line.strip()]
                entry = _parse_step(line.strip())
                if entry is None or stopping or entry["step"] == 0:
                    continue
                best = (entry["step"], entry["total"], entry["train_time_ms"])
                if entry["step"] >= steps and "val_loss" in entry:
                    stopping = True
                    proc.terminate()
            proc.wait()
        except BaseException:  # Ctrl-C: the probe is no run of the sweep; it must not train on unwatched
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        finally:
            watchdog.cancel()
    if best is None:
        why = said[0].removeprefix("error:").strip() if said else "no output"
        raise RuntimeError(f"the probe run logged no timed step (exit {proc.returncode}): {why} (its log: "
                           f"{log_path})")
    step, total, train_ms = best
    return train_ms / step, total


def _probe_cell(run, args, extra, name, records_dir):
    """Probe one cell: its first seed's command, validating at --probe_steps, writing into records/local/ (never a
    run of the sweep), without checkpoints."""
    probe_dir = records_dir / LOCAL_DIR / "sweeps" / name / "probes"
    cmd = build_command(args.train_cmd, run, extra, args.nproc) + [
        f"--val_every={args.probe_steps}", f"--records_dir={probe_dir}", "--save_every=0", "--save_checkpoint=off"]
    log_path = probe_dir / f"{run['cell']}.log"
    print(f"probe {run['cell']}: timing the first {args.probe_steps} steps (log: {log_path})", flush=True)
    ms, total = probe_step_time(cmd, args.probe_steps, log_path, args.probe_timeout)
    return {"ms_per_step": ms, "total_steps": total, "log": str(log_path)}


def estimate_sweep(todo, args, extra, name, records_dir, state, slots):
    """Hours for the runs still to do, on the parallel slots; None if some cell has no estimate. Per cell it prints
    the ms/step and where it came from: --ms_per_step, matching records, or a timed probe run (with --budget_hours
    only, not in a dry run; probes are remembered in the sweep state)."""
    records = load_runs([records_dir], NON_RUN_DIRS + (LOCAL_DIR,)) if records_dir.is_dir() else []
    extra_flags = parse_flag_args(extra)
    probes = state.setdefault("probes", {})
    total_ms, unknown = 0.0, []
    cells = {}
    for r in todo:
        cells.setdefault(r["cell"], []).append(r)
    for label, runs in cells.items():
        iters, ms, source = estimate_run_ms({**extra_flags, **runs[0]["flags"]}, records, args.ms_per_step)
        if ms is None and label in probes:
            ms, source = probes[label]["ms_per_step"], f"an earlier {args.probe_steps}-step probe run"
        if ms is None and args.budget_hours is not None and not args.dry_run:
            try:
                probes[label] = _probe_cell(runs[0], args, extra, name, records_dir)
            except RuntimeError as e:  # the sweep cannot start without this estimate: say why, once, now
                raise ValueError(f"refusing to start: {label}: {e}; fix that, or pass --ms_per_step and "
                                 "--num_iterations to skip the probe") from None
            ms, source = probes[label]["ms_per_step"], f"a {args.probe_steps}-step probe run"
            _save_state(records_dir / "sweeps" / f"{name}.json", state)
        if iters is None and label in probes:
            iters = probes[label]["total_steps"]  # the step lines' total: what the run would do
        if iters is None or ms is None:
            why = "no step count (set --num_iterations)" if iters is None else "no ms/step"
            print(f"step time {label}: unknown ({why})")
            unknown += [r["key"] for r in runs]
        else:
            print(f"step time {label}: {ms:.1f} ms/step from {source}; {iters} steps x {len(runs)} run(s)")
            total_ms += iters * ms * len(runs)
    return (None if unknown else total_ms / len(slots) / 3.6e6), unknown


def parse_baseline(spec, runs):
    """The label of the baseline cell: the first cell, or the one cell whose flags match 'name=value,...'."""
    labels = list(dict.fromkeys(r["cell"] for r in runs))
    if not spec:
        return labels[0]
    want = {}
    for pair in spec.split(","):
        k, sep, v = pair.partition("=")
        if not sep:
            raise ValueError(f"bad --baseline {spec!r}; expected name=value[,name=value]")
        want[k.strip().lstrip("-")] = v.strip()
    matches = list(dict.fromkeys(r["cell"] for r in runs
                                 if all(k in r["flags"] and _canon(r["flags"][k]) == _canon(v)
                                        for k, v in want.items())))
    if len(matches) != 1:
        raise ValueError(f"--baseline {spec} matches {len(matches)} cells; name one of: {', '.join(labels)}")
    return matches[0]


def sweep_results(state, runs, baseline):
    """One row per cell, in grid order: ok runs / seeds, mean and std of the final val loss, and the Welch t-test
    of the cell against the baseline cell (p None when either has fewer than 2 ok runs)."""
    losses, counts = {}, {}
    for r in runs:
        entry = state["runs"].get(r["key"], {})
        loss = (entry.get("summary") or {}).get("final_val_loss")
        counts.setdefault(r["cell"], {}).setdefault(entry.get("status", "not run"), 0)
        counts[r["cell"]][entry.get("status", "not run")] += 1
        losses.setdefault(r["cell"], [])
        if entry.get("status") == "ok" and loss is not None:
            losses[r["cell"]].append(float(loss))
    rows = []
    for cell, xs in losses.items():
        base = losses[baseline]
        p = diff = None
        if cell != baseline and xs and base:
            diff = float(np.mean(xs) - np.mean(base))
            if len(xs) >= 2 and len(base) >= 2:
                p = welch_test(xs, base).p
        rows.append({"cell": cell, "n": len(xs), "seeds": sum(counts[cell].values()),
                     "mean": float(np.mean(xs)) if xs else None,
                     "std": float(np.std(xs, ddof=1)) if len(xs) >= 2 else None, "diff": diff, "p": p,
                     "other": {s: n for s, n in counts[cell].items() if s != "ok"}})
    return rows


SWEEP_STATUS_NAMES = {"error": "crashed (rerun retries)", "interrupted": "interrupted (rerun retries)",
                      "failed": "diverged"}


def print_sweep_results(rows, baseline):
    width = max(len("cell"), *(len(r["cell"]) for r in rows)) + 2
    print(f"\nresults: final val loss over seeds; p: Welch t-test (two-sided) vs the baseline cell {baseline}")
    print(f"  {'cell':<{width}} {'n':>5}  {'mean +- std':>17}  {'vs baseline':>11}  {'p':>7}  other runs")
    for r in rows:
        mean = "–" if r["mean"] is None else f"{r['mean']:.4f}" + (
            f" +- {r['std']:.4f}" if r["std"] is not None else "")
        diff = "baseline" if r["cell"] == baseline else "–" if r["diff"] is None else f"{r['diff']:+.4f}"
        other = ", ".join(f"{n} {SWEEP_STATUS_NAMES.get(s, s)}" for s, n in r["other"].items())
        print(f"  {r['cell']:<{width}} {r['n']:>2}/{r['seeds']:<2}  {mean:>17}  {diff:>11}  {_fmt_p(r['p']):>7}  "
              f"{other}")
    if any(r["p"] is None and r["cell"] != baseline and r["n"] for r in rows):
        print("  (p needs at least 2 ok seeds in the cell and in the baseline)")


def _gpu_ids(n_gpus):
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in cvd.split(",") if x.strip()] if cvd is not None else None
    if n_gpus is not None:
        return (ids or [str(i) for i in range(n_gpus)])[:n_gpus]
    if ids is not None:
        return ids
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
    return []


def _save_state(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _run_one(cmd, env, log_path, prefix, print_lock, launch=subprocess.Popen):
    """Run one cell, teeing its output to log_path and stdout. Returns (exit code, parsed summary or None), or
    (None, None) when launch declined to start it (the sweep is stopping)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    summary = None
    proc = launch(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    if proc is None:
        return None, None
    with open(log_path, "w") as log, proc:
        for line in proc.stdout:
            log.write(line)
            with print_lock:
                print(prefix + line, end="", flush=True)
            if (m := _SUMMARY.search(line)):
                try:
                    summary = json.loads(m.group(1))
                except json.JSONDecodeError:
                    pass
    return proc.returncode, summary


def run_sweep(args, extra):
    grid = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if args.probe_steps < 1:
        raise ValueError(f"--probe_steps {args.probe_steps} must be >= 1")
    records_dir = Path(args.records_dir)
    name = args.sweep_name or f"sweep_{cell_hash(grid, extra)}"
    # A named sweep prefixes its run names, so two sweeps with the same cells never share a records folder.
    runs = expand_sweep(grid, seeds, f"{args.sweep_name}." if args.sweep_name else "")
    baseline = parse_baseline(args.baseline, runs)
    state_path = records_dir / "sweeps" / f"{name}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"name": name, "runs": {}}
    state.update(grid=grid, extra=list(extra), train_cmd=args.train_cmd)
    finished = ("ok",) if args.retry_failed else ("ok", "failed")
    todo = [r for r in runs if state["runs"].get(r["key"], {}).get("status") not in finished]
    print(f"sweep {name}: {len(runs) // len(seeds)} cells x {len(seeds)} seeds = {len(runs)} runs, "
          f"{len(runs) - len(todo)} finished, {len(todo)} to run (state: {state_path})")

    gpus = _gpu_ids(args.gpus)
    per_run = args.gpus_per_run or args.nproc
    slots = [gpus[i:i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
    slots = slots if len(slots) > 1 else [None]  # one slot: leave CUDA_VISIBLE_DEVICES as it is

    if todo:
        hours, unknown = estimate_sweep(todo, args, extra, name, records_dir, state, slots)
        if unknown:
            print(f"time estimate: unknown for {len(unknown)} runs"
                  + ("" if args.budget_hours is not None else " (--budget_hours would probe them)"))
        else:
            print(f"time estimate: {hours:.2f} h on {len(slots)} parallel slot(s) (timed steps only; compile "
                  "warm-up and validation come on top)")
        if args.budget_hours is not None and unknown and not args.dry_run:
            print(f"error: refusing to start: cannot check --budget_hours {args.budget_hours:g} without an estimate "
                  f"for {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}; pass --ms_per_step (and "
                  "--num_iterations in the grid or after --)", file=sys.stderr)
            return 2
        if args.budget_hours is not None and hours is not None and hours > args.budget_hours:
            print(f"error: refusing to start: estimated {hours:.2f} h exceeds --budget_hours {args.budget_hours:g}; "
                  "raise it, or drop cells or seeds", file=sys.stderr)
            return 2

    commands = [(r, build_command(args.train_cmd, r, extra, args.nproc, args.records_dir)) for r in todo]
    if args.dry_run:
        for r, cmd in commands:
            print(" ".join(shlex.quote(c) for c in cmd))
        return 0
    if todo:
        _save_state(state_path, state)
        try:
            _execute(commands, slots, state, state_path, records_dir / LOCAL_DIR / "sweeps" / name)
        except SweepInterrupted as e:
            ended, stopped, never = e.args
            print(f"sweep {name} stopped by a signal: {len(ended)} run(s) ended, {len(stopped)} interrupted "
                  f"({', '.join(stopped) or 'none'}), {never} not started; rerun the same command to retry the "
                  f"interrupted and run the rest (state: {state_path})", file=sys.stderr)
            return 130
    print_sweep_results(sweep_results(state, runs, baseline), baseline)
    if args.fit:
        fit_sweep(state, name, Path(args.fit_out) if args.fit_out else records_dir / "sweeps" / f"{name}_fit.png")
    failed = [r["key"] for r in runs if state["runs"].get(r["key"], {}).get("status") != "ok"]
    if failed:
        print(f"{len(failed)} runs did not finish ok: {', '.join(failed)}; rerun the same command to retry "
              "crashed ones" + ("" if args.retry_failed else " (--retry_failed also reruns diverged ones)"))
    return 1 if any(state["runs"].get(r["key"], {}).get("status") in RETRIED for r in todo) else 0


def _sweep_status(summary):
    """"ok", "failed" (finished but diverged: a full summary, final_val_loss null), "interrupted" (stopped by a
    signal) or "error" (crashed or killed: no summary, or a short one without final_val_loss). "error" and
    "interrupted" runs are retried by default; a summary means the run finished even if the process then exited
    nonzero."""
    if not summary:
        return "error"
    status = summary.get("status", "ok")
    if status == "interrupted":
        return status
    return "error" if status != "ok" and "final_val_loss" not in summary else status


RETRIED = ("error", "interrupted")  # statuses a rerun runs again without --retry_failed


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the sweep; args: (keys of the runs that ended, keys interrupted, runs not started)."""


def _execute(commands, slots, state, state_path, log_dir):
    """Run the commands, one per slot at a time; each slot is a list of GPU ids (or None: sequential, env as is).

    Each run starts in its own session, so a Ctrl-C at the terminal reaches the sweep alone; the sweep passes each
    SIGINT / SIGTERM on to the running runs (train_gpt.py stops at the next step boundary, or at once on a second
    signal), starts no further run, and raises SweepInterrupted once the running ones have ended. Interrupted runs
    are recorded as such, so a rerun of the same command retries them and then runs the rest."""
    free, lock = queue.Queue(), threading.Lock()
    for s in slots:
        free.put(s)
    stop, procs, procs_lock = threading.Event(), [], threading.Lock()
    ended, interrupted = [], []

    def launch(*a, **kw):
        with procs_lock:  # a signal is either seen before the start (no start) or passed on to the started run
            if stop.is_set():
                return None
            proc = subprocess.Popen(*a, start_new_session=True, **kw)
            procs.append(proc)
            return proc

    def on_signal(signum, frame):
        if not stop.is_set():
            print(f"\nsweep: {signal.Signals(signum).name}: stopping the running run(s) at their next step (send it "
                  "again to stop them at once); no further run starts", file=sys.stderr, flush=True)
        stop.set()
        with procs_lock:
            for proc in procs:
                try:
                    proc.send_signal(signum)  # a no-op for a run that has ended
                except ProcessLookupError:
                    pass

    def work(i, run, cmd):
        slot = free.get()
        try:
            if stop.is_set():
                return
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
            with lock:
                print(f"[{i + 1}/{len(commands)}] {' '.join(shlex.quote(c) for c in cmd)}"
                      + (f"  (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})" if slot else ""), flush=True)
            rc, summary = _run_one(cmd, env, log_dir / f"{run['key']}.log", f"[{run['key']}] ", lock, launch)
        finally:
            free.put(slot)
        if rc is None:
            return
        status = _sweep_status(summary)
        if stop.is_set() and status == "error":  # e.g. stopped at once by a second signal, before its summary
            status = "interrupted"
        entry = dict(run, status=status, returncode=rc, summary=summary, record=(summary or {}).get("record"))
        with lock:
            state["runs"][run["key"]] = entry
            _save_state(state_path, state)
            (interrupted if status == "interrupted" else ended).append(run["key"])
            print(f"[{run['key']}] {status} (exit {rc})" + (f", record {entry['record']}" if entry["record"] else ""))

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            for f in [pool.submit(work, i, r, c) for i, (r, c) in enumerate(commands)]:
                f.result()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop.is_set():
        raise SweepInterrupted(ended, interrupted, len(commands) - len(ended) - len(interrupted))

# -----------------------------------------------------------------------------
# Scaling-law fit


def approx_params(hparams):
    """Non-embedding parameter count of the blocks, approximately 12 * num_layers * model_dim^2 (attention 4 d^2 +
    MLP 8 d^2 per block); used when a run's summary carries no "params"."""
    return 12 * int(hparams["num_layers"]) * int(hparams["model_dim"]) ** 2


def _law(X, E, logA, a, logB, b):
    logN, logD = X
    return E + np.exp(logA - a * logN) + np.exp(logB - b * logD)


def fit_scaling_law(N, D, L):
    """Least-squares fit of L(N, D) = E + A / N^a + B / D^b. Returns {E, A, a, B, b, rmse, n}.
    A and B are fitted in log space, and several starting exponents are tried since the loss surface is not convex."""
    from scipy.optimize import curve_fit
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if len(L) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 points, got {len(L)}")
    X = (np.log(N), np.log(D))
    best = None
    for a0, b0 in itertools.product((0.1, 0.3, 0.6), repeat=2):
        E0 = 0.5 * L.min()
        gap = max(float(np.median(L) - E0), 1e-3) / 2
        p0 = [E0, math.log(gap) + a0 * float(np.median(X[0])), a0, math.log(gap) + b0 * float(np.median(X[1])), b0]
        bounds = ([0, -50, 0.01, -50, 0.01], [L.min(), 200, 3, 200, 3])
        try:
            p, _ = curve_fit(_law, X, L, p0=p0, bounds=bounds, maxfev=20000)
        except RuntimeError:
            continue
        sse = float(np.sum((_law(X, *p) - L) ** 2))
        if best is None or sse < best[0]:
            best = (sse, p)
    if best is None:
        raise RuntimeError("the scaling-law fit did not converge from any starting point")
    sse, (E, logA, a, logB, b) = best
    return {"E": float(E), "A": math.exp(logA), "a": float(a), "B": math.exp(logB), "b": float(b),
            "rmse": math.sqrt(sse / len(L)), "n": int(len(L))}


def fit_sweep(state, name, out):
    """Fit the scaling law to the sweep's ok runs and save a plot of loss vs tokens with the fitted curves.
    N is the summary's "non_embedding_params", else its "params", else approx_params(hparams)."""
    points = []
    for entry in state["runs"].values():
        summary = entry.get("summary") or {}
        if entry.get("status") != "ok" or summary.get("final_val_loss") is None:
            continue
        n_params = summary.get("non_embedding_params") or summary.get("params")
        if n_params is None:
            try:
                n_params = approx_params(parse_record(entry["record"]).hparams)
            except (OSError, KeyError, TypeError, ValueError) as e:
                print(f"fit: skipping {entry['key']}: no parameter count ({e})", file=sys.stderr)
                continue
        points.append((n_params, summary["tokens"], summary["final_val_loss"]))
    try:
        if len(points) < 5:
            raise ValueError(f"fitting 5 parameters needs at least 5 ok runs, got {len(points)}")
        fit = fit_scaling_law(*zip(*points))
    except (ValueError, RuntimeError) as e:
        print(f"fit: {e}", file=sys.stderr)
        return None
    print(f"fit over {fit['n']} runs: L(N, D) = {fit['E']:.4f} + {fit['A']:.4g} / N^{fit['a']:.4f} "
          f"+ {fit['B']:.4g} / D^{fit['b']:.4f}   (rmse {fit['rmse']:.2e})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N, D, L = map(np.array, zip(*points))
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for n in sorted(set(N)):
        m = N == n
        d = np.geomspace(D.min(), D.max(), 100)
        line, = ax.plot(d, _law((np.log(n), np.log(d)), fit["E"], math.log(fit["A"]), fit["a"],
                                math.log(fit["B"]), fit["b"]), lw=1)
        ax.scatter(D[m], L[m], color=line.get_color(), label=f"N={n:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("final val loss")
    ax.set_title(f"{name}: E={fit['E']:.3f}, a={fit['a']:.3f}, b={fit['b']:.3f}")
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return fit

# -----------------------------------------------------------------------------
# Command line


def build_parser():
    w = argparse.ArgumentParser(prog="sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--grid", action="append", default=[], help="name=v1,v2 (repeatable)")
    w.add_argument("--seeds", default="0")
    w.add_argument("--sweep_name", default=None,
                   help="default: sweep_<hash of grid and extra flags>; a given name also prefixes the run names")
    w.add_argument("--records_dir", default="records")
    w.add_argument("--train_cmd", default="python train_gpt.py")
    w.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    w.add_argument("--gpus_per_run", type=int, default=None, help="default: --nproc")
    w.add_argument("--gpus", type=int, default=None,
                   help="GPUs to spread runs over (default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    w.add_argument("--budget_hours", type=float, default=None)
    w.add_argument("--ms_per_step", type=float, default=None,
                   help="default: mean step_avg of the records with the same flags, else (with --budget_hours) a "
                        "timed probe run of each cell")
    w.add_argument("--probe_steps", type=int, default=20, help="steps a probe run times (then it is stopped)")
    w.add_argument("--probe_timeout", type=float, default=1800, help="seconds before a probe run is killed")
    w.add_argument("--baseline", default=None,
                   help="name=value[,name=value]: the cell the results table tests against (default: the first)")
    w.add_argument("--dry_run", action="store_true")
    w.add_argument("--retry_failed", action="store_true", help="rerun runs that ended with status failed")
    w.add_argument("--fit", action="store_true", help="fit L(N, D) = E + A/N^a + B/D^b to the ok runs")
    w.add_argument("--fit_out", default=None, help="default: <records_dir>/sweeps/<sweep_name>_fit.png")
    return w


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    try:
        try:
            return run_sweep(args, extra)
        except ValueError as e:  # the sweep's bad arguments and refusals
            print(f"error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # a sweep's runs are stopped by _execute's handler; this is any other moment
        print("sweep: interrupted; no run of the sweep was going, rerun the same command to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
