"""Read, summarize, compare and produce run records (`records/<track>/<date>_<run_name>/<uuid>.txt`).

    python tools/records.py table   [--records_dir records] [--target 3.28] [--include_local]
    python tools/records.py stats   FILES... [--target 3.28] [--alpha 0.01] [--vs FILES...]
    python tools/records.py compare A B ... --out plot.png [--labels a,b] [--zoom 0.3] [--subject flag,...]
    python tools/records.py sweep   --grid name=v1,v2 ... --seeds 0,1 [--budget_hours H] [--fit] [-- extra flags]

A record file is what train_gpt.py writes for one run: the sources, the environment, the hyperparameters
(`hparams: {json}` and `flags: {json}`), then the log (`step:N/T ...` lines, peak memory, and a final
`summary: {json}` line). A run with a summary is "ok" or "failed" (summary["status"]); one without is "incomplete".
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
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TARGET = 3.28
TABLE_START = "<!-- records-table:start -->"
TABLE_END = "<!-- records-table:end -->"
# Sub-directories of records/ that hold no run records (benchmarks, sweep state) or are git-ignored smoke runs.
NON_RUN_DIRS = ("kernels", "sweeps")
LOCAL_DIR = "local"
# Hyperparameters that differ from run to run, or do not change the experiment; never reported as confounds and
# ignored when matching a sweep cell to earlier records.
PER_RUN_KEYS = {"seed", "run_name", "run_id", "uuid", "date", "git_commit", "record", "records_dir", "save_checkpoint"}
# Flags not shown in the table's flags column (seed varies inside a group; track and run name have their own columns).
HIDDEN_FLAGS = {"track"} | PER_RUN_KEYS

# -----------------------------------------------------------------------------
# Parsing record files

_HEADER = re.compile(r"^={20} (.+?) ={20}$")
_STEP = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+):(\S+)")
_PEAK = re.compile(r"^peak memory (?:allocated|\(max RSS\)): (\d+(?:\.\d+)?) MiB")  # GPU, or CPU runs
_SUMMARY = re.compile(r"summary: (\{.*\})\s*$")


@dataclass
class Run:
    """One parsed record file. `steps` holds every step line as a dict: step, total, train_time_ms, step_avg_ms
    and, at validation points, val_loss."""
    path: Path
    hparams: dict
    flags: dict
    steps: list
    summary: dict | None
    status: str  # "ok", "failed" or "incomplete"
    reason: str | None = None
    environment: str = ""
    peak_memory_mib: float | None = None

    # Grouping follows the path: records/<track>/<date>_<run_name>/<uuid>.txt.
    @property
    def track(self):
        return self.path.parent.parent.name

    @property
    def folder(self):
        return self.path.parent.name

    @property
    def date(self):
        m = re.match(r"^(\d{4}-\d{2}-\d{2})_", self.folder)
        return m.group(1) if m else (self.summary or {}).get("date", "")

    @property
    def run_name(self):
        m = re.match(r"^\d{4}-\d{2}-\d{2}_(.*)$", self.folder)
        return m.group(1) if m else self.hparams.get("run_name", self.folder)

    def _from_summary(self, key):
        return (self.summary or {}).get(key)

    @property
    def tokens_per_step(self):
        tps = self._from_summary("tokens_per_step") or self.hparams.get("tokens_per_step")
        if tps is None and "seq_len" in self.hparams:  # global batch: micro_batches sequences of seq_len tokens
            tps = self.hparams.get("micro_batches", 8) * self.hparams["seq_len"]
        return tps

    @property
    def val_points(self):
        """(step, tokens, train_time_ms, val_loss) at every validation, in log order."""
        tps = self.tokens_per_step or 0
        return [(s["step"], s["step"] * tps, s["train_time_ms"], s["val_loss"]) for s in self.steps if "val_loss" in s]

    @property
    def final_val_loss(self):
        if self.summary is not None:  # a failed run's summary says null: no final loss
            loss = self.summary.get("final_val_loss")
        else:
            loss = self.val_points[-1][3] if self.val_points else None
        return None if loss is None else float(loss)

    @property
    def train_time_ms(self):
        t = self._from_summary("train_time_ms")
        return t if t is not None else (self.steps[-1]["train_time_ms"] if self.steps else None)

    @property
    def step_avg_ms(self):
        t = self._from_summary("step_avg_ms")
        if t is None and self.steps:
            t = self.steps[-1].get("step_avg_ms")
        return None if t is None or (isinstance(t, float) and math.isnan(t)) else t

    @property
    def num_steps(self):
        s = self._from_summary("steps")
        return s if s is not None else (self.steps[-1]["step"] if self.steps else 0)

    @property
    def tokens(self):
        t = self._from_summary("tokens")
        if t is None and self.tokens_per_step is not None:
            t = self.num_steps * self.tokens_per_step
        return t

    @property
    def world_size(self):
        return self._from_summary("world_size") or self.hparams.get("world_size")

    @property
    def device(self):
        return self._from_summary("device") or self.hparams.get("device")


def _split_sections(lines):
    """Map section name -> (first, last) line range. The sources come first and may themselves contain header-like
    lines, so the trailing sections are located from the end: log is the last "log" header, hyperparameters the last
    one before it, and environment the last one before that."""
    headers = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _HEADER.match(line))]
    sections, end = {}, len(lines)
    for name in ("log", "hyperparameters", "environment"):
        found = [i for i, n in headers if n == name and i < end]
        if found:
            sections[name] = (found[-1] + 1, end)
            end = found[-1]
    return sections


def _parse_step(line):
    m = _STEP.match(line)
    if not m:
        return None
    entry = {"step": int(m.group(1)), "total": int(m.group(2))}
    for key, value in _FIELD.findall(m.group(3)):
        value = value.removesuffix("ms")
        try:
            entry[key + "_ms" if key in ("train_time", "step_avg") else key] = float(value)
        except ValueError:
            pass
    return entry if "train_time_ms" in entry else None  # a line cut off by a kill is not a step


def parse_record(path):
    """Parse one record file into a Run. Raises ValueError for a file that is not a train_gpt.py record."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and not _HEADER.match(lines[0]):
        raise ValueError(f"{path}: not a train_gpt.py record (no section header on the first line)")
    sections = _split_sections(lines)
    hparams, flags = {}, {}
    if "hyperparameters" in sections:
        a, b = sections["hyperparameters"]
        for line in lines[a:b]:
            for key, target in (("hparams: ", hparams), ("flags: ", flags)):
                if line.startswith(key):
                    try:
                        target.update(json.loads(line[len(key):]))
                    except json.JSONDecodeError:
                        pass
    steps, summary, reason, peak = [], None, None, None
    if "log" in sections:
        a, b = sections["log"]
        for line in lines[a:b]:
            if (entry := _parse_step(line)) is not None:
                steps.append(entry)
            elif line.startswith("status: failed"):
                reason = line.partition("reason:")[2].strip() or None
            elif (m := _PEAK.match(line)):
                peak = float(m.group(1))
            elif (m := _SUMMARY.match(line)):
                try:
                    summary = json.loads(m.group(1))
                except json.JSONDecodeError:
                    pass  # a summary cut off mid-line: the run did not finish writing
    if summary is not None:
        status = summary.get("status", "ok")
        reason = summary.get("reason", reason)
        if not flags:
            flags = summary.get("flags") or {}
    else:
        status = "failed" if reason is not None else "incomplete"
    env = "\n".join(lines[slice(*sections["environment"])]) if "environment" in sections else ""
    return Run(path, hparams, flags, steps, summary, status, reason, env, peak)


def find_record_files(paths, skip_dirs=NON_RUN_DIRS):
    """Record .txt files under the given files/directories; directories are searched recursively, skipping any
    sub-directory named in skip_dirs (relative to the directory given)."""
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*.txt")
                            if not set(f.relative_to(p).parts[:-1]) & set(skip_dirs))
        else:
            raise FileNotFoundError(f"no such record file or directory: {p}")
    return files


def load_runs(paths, skip_dirs=NON_RUN_DIRS):
    """Parse every record under paths. Unparseable files are reported on stderr, never dropped silently."""
    runs = []
    for f in find_record_files(paths, skip_dirs):
        try:
            runs.append(parse_record(f))
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return runs

# -----------------------------------------------------------------------------
# Statistics


@dataclass
class OneSampleTest:
    """One-sided one-sample t-test of H1: mean < target, with a two-sided confidence interval for the mean."""
    n: int
    mean: float
    std: float
    ci: tuple
    t: float
    df: int
    p: float
    target: float
    alpha: float

    @property
    def significant(self):
        return bool(self.p < self.alpha)


@dataclass
class WelchTest:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (two-sided), with a confidence interval for it."""
    diff: float
    ci: tuple
    t: float
    df: float
    p: float


def one_sample_test(losses, target=DEFAULT_TARGET, alpha=0.01, confidence=0.95):
    from scipy import stats
    x = np.asarray(losses, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return OneSampleTest(n, mean, math.nan, (math.nan, math.nan), math.nan, max(n - 1, 0), math.nan, target, alpha)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    df = n - 1
    if sem == 0:  # identical losses: the test degenerates to comparing the value with the target
        t = math.copysign(math.inf, mean - target) if mean != target else 0.0
        p = 0.0 if mean < target else 1.0
    else:
        t = (mean - target) / sem
        p = float(stats.t.cdf(t, df))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * sem
    return OneSampleTest(n, mean, std, (mean - half, mean + half), t, df, p, target, alpha)


def welch_test(a, b, confidence=0.95):
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least 2 runs in each group")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = float(a.mean() - b.mean()), math.sqrt(va + vb)
    if se == 0:
        t = math.copysign(math.inf, diff) if diff else 0.0
        return WelchTest(diff, (diff, diff), t, float(len(a) + len(b) - 2), 0.0 if diff else 1.0)
    df = float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)))
    t = diff / se
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return WelchTest(diff, (diff - half, diff + half), t, df, float(2 * stats.t.sf(abs(t), df)))

# -----------------------------------------------------------------------------
# The records table


def _canon(value):
    """Canonical string for comparing hyperparameter values across JSON records and command-line strings."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower()
        try:
            return repr(float(value))
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True)


def _fmt_value(value):
    return value if isinstance(value, str) else json.dumps(value)


def _fmt_tokens(n):
    if n is None:
        return "–"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(int(n))


def _fmt_p(p):
    return "–" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_range(values, fmt):
    values = sorted(set(v for v in values if v is not None))
    if not values:
        return "–"
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}–{fmt(values[-1])}"


def compact_flags(runs):
    """The flags shared by all runs of a group as `k=v` pairs, plus the names of flags that vary inside it."""
    per_run = [{k: _fmt_value(v) for k, v in r.flags.items() if k not in HIDDEN_FLAGS} for r in runs]
    keys = sorted(set().union(*per_run)) if per_run else []
    common = [k for k in keys if all(k in f and f[k] == per_run[0].get(k) for f in per_run)]
    varies = [k for k in keys if k not in common]
    text = ", ".join(f"{k}={per_run[0][k]}" for k in common)
    if varies:
        text += (", " if text else "") + f"(varies: {', '.join(varies)})"
    return text


def group_runs(runs):
    """{(track, folder): [runs]} in sorted order."""
    groups = {}
    for r in sorted(runs, key=lambda r: (r.track, r.folder, r.path.name)):
        groups.setdefault((r.track, r.folder), []).append(r)
    return groups


def table_rows(runs, target=DEFAULT_TARGET):
    """One dict per (track, date_runname) group. Loss statistics use the ok runs only; the timing columns use the
    ok runs, or every run of a group that has none (so an incomplete group still shows how far it got)."""
    rows = []
    for (track, _), group in group_runs(runs).items():
        ok = [r for r in group if r.status == "ok" and r.final_val_loss is not None]
        counts = {s: sum(r.status == s for r in group) for s in ("failed", "incomplete")}
        extra = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        test = one_sample_test([r.final_val_loss for r in ok], target)
        shown = ok or group
        times = [r.train_time_ms for r in shown if r.train_time_ms is not None]
        step_avgs = [r.step_avg_ms for r in shown if r.step_avg_ms is not None]
        devices = sorted(set(str(r.device).removeprefix("NVIDIA ") for r in shown if r.device))
        rows.append({
            "track": track,
            "date": group[0].date,
            "run name": group[0].run_name,
            "runs": f"{len(ok)}/{len(group)}" + (f" ({extra})" if extra else ""),
            "mean val loss": f"{test.mean:.4f}" if ok else "–",
            "std": "–" if math.isnan(test.std) else f"{test.std:.4f}",
            f"p(<{target:g})": _fmt_p(test.p),
            "time (s)": f"{np.mean(times) / 1000:.1f}" if times else "–",
            "ms/step": f"{np.mean(step_avgs):.2f}" if step_avgs else "–",
            "steps": _fmt_range([r.num_steps for r in shown], str),
            "tokens": _fmt_range([r.tokens for r in shown], _fmt_tokens),
            "world size": _fmt_range([r.world_size for r in shown], str),
            "GPU": " / ".join(devices) or "–",
            "flags": compact_flags(group),
        })
    return rows


def format_table(rows, target=DEFAULT_TARGET):
    header = ["track", "date", "run name", "runs", "mean val loss", "std", f"p(<{target:g})", "time (s)", "ms/step",
              "steps", "tokens", "world size", "GPU", "flags"]

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r[h] for h in header) for r in rows])


def replace_between_markers(text, table):
    """Put table between the README markers, leaving every byte outside them untouched."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README must contain the lines {TABLE_START} and {TABLE_END} (in that order); "
                         "add them where the records table should go")
    return text[:start + len(TABLE_START)] + "\n" + table + "\n" + text[end:]


def cmd_table(args):
    records_dir = Path(args.records_dir)
    skip = NON_RUN_DIRS + (() if args.include_local else (LOCAL_DIR,))
    runs = load_runs([records_dir], skip) if records_dir.is_dir() else []
    table = format_table(table_rows(runs, args.target), args.target)
    print(table)
    if not args.write:  # printing never dirties the tree (a later run would record git_commit ...-dirty)
        return 0
    readme = Path(args.readme) if args.readme else records_dir / "README.md"
    if not readme.exists():
        print(f"error: {readme} does not exist; create it with the lines {TABLE_START} and {TABLE_END}",
              file=sys.stderr)
        return 1
    try:  # bytes in and out, so that line endings outside the markers survive unchanged
        new = replace_between_markers(readme.read_bytes().decode("utf-8"), table)
    except ValueError as e:
        print(f"error: {readme}: {e}", file=sys.stderr)
        return 1
    readme.write_bytes(new.encode("utf-8"))
    print(f"wrote the table ({len(runs)} runs) to {readme}")
    return 0

# -----------------------------------------------------------------------------
# stats


def _ok_losses(runs, label):
    ok = [r.final_val_loss for r in runs if r.status == "ok" and r.final_val_loss is not None]
    others = {s: sum(r.status == s for r in runs) for s in ("failed", "incomplete")}
    excluded = ", ".join(f"{n} {s}" for s, n in others.items() if n)
    print(f"{label}: {len(runs)} runs, {len(ok)} ok" + (f" (excluded: {excluded})" if excluded else ""))
    return ok


def cmd_stats(args):
    groups = [("A", load_runs(args.files))] + ([("B", load_runs(args.vs))] if args.vs else [])
    samples = []
    for label, runs in groups:
        losses = _ok_losses(runs, f"group {label}")
        samples.append(losses)
        test = one_sample_test(losses, args.target, args.alpha)
        if test.n < 2:
            print(f"  n={test.n} mean={test.mean:.4f}: a t-test needs at least 2 ok runs")
            continue
        times = [r.train_time_ms / 1000 for r in runs if r.status == "ok" and r.train_time_ms is not None]
        print(f"  n={test.n}  mean={test.mean:.5f}  std={test.std:.5f}  95% CI [{test.ci[0]:.5f}, {test.ci[1]:.5f}]")
        if times:
            print(f"  timed training: mean {np.mean(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")
        print(f"  one-sided t-test, H1: mean < {args.target:g}: t={test.t:.3f} df={test.df} p={test.p:.3g}")
        verdict = "significant: mean < target" if test.significant else "NOT significant"
        print(f"  verdict at alpha={args.alpha:g}: {verdict}")
    if args.vs:
        try:
            w = welch_test(*samples)
        except ValueError as e:
            print(f"Welch t-test: {e}")
            return 1
        print(f"Welch t-test, mean(A) - mean(B) = {w.diff:+.5f}  95% CI [{w.ci[0]:+.5f}, {w.ci[1]:+.5f}]  "
              f"t={w.t:.3f} df={w.df:.2f} p(two-sided)={w.p:.3g}")
    return 0

# -----------------------------------------------------------------------------
# compare


@dataclass
class Curve:
    """A group's mean val loss on a grid of x (tokens or seconds), with the min/max and std across runs."""
    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    std: np.ndarray


def group_curve(runs, axis):
    """Interpolate every run's val curve onto the union of their x values within the range all runs cover."""
    curves = []
    for r in runs:
        pts = [(tok if axis == "tokens" else t / 1000, loss)
               for _, tok, t, loss in r.val_points if not math.isnan(loss)]
        if len(pts) >= 2:
            curves.append(np.array(pts).T)
    if not curves:
        return None
    lo_x, hi_x = max(c[0].min() for c in curves), min(c[0].max() for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= lo_x) & (grid <= hi_x)]
    ys = np.stack([np.interp(grid, c[0], c[1]) for c in curves])
    return Curve(grid, ys.mean(0), ys.min(0), ys.max(0), ys.std(0))


def _comparable(run):
    d = {k: v for k, v in run.hparams.items() if k not in PER_RUN_KEYS}
    for key in ("world_size", "device"):  # timings across different hardware are not comparable either
        if getattr(run, key) is not None:
            d.setdefault(key, getattr(run, key))
    return d


def hparam_differences(groups, subject=()):
    """[(key, [values per group])] for every hyperparameter that is not the same single value in all groups,
    ignoring per-run keys and the subject of the comparison. A group mixing values shows them joined by '|'."""
    per_group = []
    for runs in groups:
        values = {}
        for r in runs:
            for k, v in _comparable(r).items():
                values.setdefault(k, set()).add(_canon(v))
        per_group.append(values)
    keys = sorted(set().union(*per_group)) if per_group else []
    diffs = []
    for k in keys:
        if k in subject:
            continue
        vals = ["|".join(sorted(g.get(k, {"<missing>"}))) for g in per_group]
        if len(set(vals)) > 1 or any("|" in v for v in vals):
            diffs.append((k, vals))
    return diffs


def _selected(runs, label):
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        print(f"note: {label} has no ok runs; plotting its {len(runs)} failed/incomplete runs", file=sys.stderr)
    return ok or runs


def _labels(paths, given):
    if given:
        labels = given.split(",") if isinstance(given, str) else list(given)
        if len(labels) != len(paths):
            raise ValueError(f"--labels has {len(labels)} names for {len(paths)} groups")
        return labels
    labels = []
    for p in map(Path, paths):
        label = p.name if p.is_dir() else f"{p.parent.name}/{p.stem[:8]}"
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    return labels


def _crossing(curve, target):
    """First x at which the mean curve reaches target (linear interpolation), or None."""
    below = np.nonzero(curve.mean <= target)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(curve.x[0])
    x0, x1, y0, y1 = curve.x[i - 1], curve.x[i], curve.mean[i - 1], curve.mean[i]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))


def plot_compare(curves_by_axis, labels, out, zoom, band, target):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (axis, curves) in zip(axes, curves_by_axis.items()):
        xmax = max(c.x[-1] for c in curves if c is not None)
        x0 = xmax * (1 - zoom)
        visible = []
        for label, c in zip(labels, curves):
            if c is None:
                continue
            ax.plot(c.x, c.mean, label=label)
            lo, hi = (c.lo, c.hi) if band == "minmax" else (c.mean - c.std, c.mean + c.std)
            if band != "none":
                ax.fill_between(c.x, lo, hi, alpha=0.2)
            m = c.x >= x0
            visible += [lo[m], hi[m]] if band != "none" else [c.mean[m]]
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xlim(x0, xmax)
        vis = np.concatenate(visible) if visible else np.array([])
        if vis.size:
            pad = 0.05 * (vis.max() - vis.min() or 0.01)
            ax.set_ylim(vis.min() - pad, vis.max() + pad)
        ax.set_xlabel("tokens" if axis == "tokens" else "timed training (s)")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"val loss, last {zoom:.0%} of the x range (band: {band} over runs)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_compare(args):
    try:
        labels = _labels(args.groups, args.labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    groups = [load_runs([g]) for g in args.groups]
    for label, runs in zip(labels, groups):
        if not runs:
            print(f"error: no record files in {label}", file=sys.stderr)
            return 1
    subject = [s for s in (args.subject or "").split(",") if s]
    diffs = hparam_differences(groups, subject)
    if diffs:
        print(f"WARNING: the compared groups differ in hyperparameters other than the subject "
              f"(--subject {','.join(subject) or '<none>'}); differences may be confounded:", file=sys.stderr)
        for key, vals in diffs:
            print("WARNING:   " + key + ": " + "  ".join(f"{l}={v}" for l, v in zip(labels, vals)), file=sys.stderr)
    selected = [_selected(runs, label) for label, runs in zip(labels, groups)]
    curves = {axis: [group_curve(runs, axis) for runs in selected] for axis in ("tokens", "time")}
    if any(c is None for cs in curves.values() for c in cs):
        print("error: every group needs at least one run with two or more validation points", file=sys.stderr)
        return 1
    plot_compare(curves, labels, args.out, args.zoom, args.band, args.target)
    print(f"wrote {args.out}")
    for axis, unit in (("tokens", _fmt_tokens), ("time", lambda s: f"{s:.1f}s")):
        cs = curves[axis]
        common = min(c.x[-1] for c in cs)
        xs = np.linspace(common * (1 - args.zoom), common, 4)
        print(f"\nval loss at equal {axis} (difference vs {labels[0]}):")
        print(f"  {axis:>10}  " + "  ".join(f"{l:>22}" for l in labels))
        for x in xs:
            ys = [float(np.interp(x, c.x, c.mean)) for c in cs]
            cells = [f"{ys[0]:.4f}"] + [f"{y:.4f} ({y - ys[0]:+.4f})" for y in ys[1:]]
            print(f"  {unit(x):>10}  " + "  ".join(f"{c:>22}" for c in cells))
        reach = [_crossing(c, args.target) for c in cs]
        print(f"  reaches {args.target:g} at: " + ", ".join(
            f"{l}={unit(x) if x is not None else 'never'}" for l, x in zip(labels, reach)))
    return 0

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


def expand_sweep(grid, seeds, extra):
    """Every (cell, seed) as a run dict. All seeds of a cell share its run name, so they form one records group."""
    names = list(grid)
    runs = []
    for values in itertools.product(*(grid[n] for n in names)):
        cell = dict(zip(names, values))
        run_name = f"sweep_{cell_hash(cell, extra)}"
        for seed in seeds:
            runs.append({"key": f"{run_name}_seed{seed}", "flags": cell, "seed": seed, "run_name": run_name})
    return runs


def build_command(train_cmd, run, extra, nproc):
    cmd = shlex.split(train_cmd)
    if cmd and cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    if nproc > 1:  # torchrun, run by this interpreter so that it is the same environment's torch
        if cmd and cmd[0] == sys.executable:
            cmd = cmd[1:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd
    return (cmd + [f"--{k}={v}" for k, v in run["flags"].items()] + list(extra)
            + [f"--run_name={run['run_name']}", f"--seed={run['seed']}"])


def same_config(config, run):
    """Whether run was trained with these command-line flags: each flag matches the run's hyperparameter, and
    every non-default flag of the run (other than per-run ones) is among them. Flags set to their default value
    are absent from a record's flags, hence the comparison against hparams."""
    hp = {**run.flags, **run.hparams}
    return (all(k in hp and _canon(hp[k]) == _canon(v) for k, v in config.items() if k not in PER_RUN_KEYS)
            and all(k in config for k in run.flags if k not in PER_RUN_KEYS))


def estimate_run_ms(config, records, ms_per_step=None):
    """(num_iterations, ms/step) for a run with these flags. ms/step: ms_per_step if given, else the mean step_avg
    of the records with the same flags (a diverged or killed run's step_avg is as good a timing as any).
    num_iterations: the flag, else those records' hparams, else the default (from any record that sets neither
    num_iterations nor a preset)."""
    same = [r for r in records if same_config(config, r)]
    if ms_per_step is None:
        avgs = [r.step_avg_ms for r in same if r.step_avg_ms is not None]
        ms_per_step = float(np.mean(avgs)) if avgs else None
    iters = config.get("num_iterations")
    if iters is None:
        donors = same or [r for r in records if not {"num_iterations", "preset"} & set(r.flags)]
        donors = [r for r in donors if "num_iterations" in r.hparams]
        iters = donors[0].hparams["num_iterations"] if donors else None
    return (None if iters is None else int(float(iters))), ms_per_step


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


def _run_one(cmd, env, log_path, prefix, print_lock):
    """Run one cell, teeing its output to log_path and stdout. Returns (exit code, parsed summary or None)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    summary = None
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
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
    records_dir = Path(args.records_dir)
    name = args.sweep_name or f"sweep_{cell_hash(grid, extra)}"
    state_path = records_dir / "sweeps" / f"{name}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"name": name, "runs": {}}
    state.update(grid=grid, extra=list(extra), train_cmd=args.train_cmd)
    runs = expand_sweep(grid, seeds, extra)
    finished = ("ok",) if args.retry_failed else ("ok", "failed")
    todo = [r for r in runs if state["runs"].get(r["key"], {}).get("status") not in finished]
    print(f"sweep {name}: {len(runs) // len(seeds)} cells x {len(seeds)} seeds = {len(runs)} runs, "
          f"{len(runs) - len(todo)} finished, {len(todo)} to run (state: {state_path})")

    gpus = _gpu_ids(args.gpus)
    per_run = args.gpus_per_run or args.nproc
    slots = [gpus[i:i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
    slots = slots if len(slots) > 1 else [None]  # one slot: leave CUDA_VISIBLE_DEVICES as it is

    records = load_runs([records_dir], NON_RUN_DIRS + (LOCAL_DIR,)) if records_dir.is_dir() else []
    extra_flags = parse_flag_args(extra)
    total_ms, unknown = 0.0, []
    for r in todo:
        iters, ms = estimate_run_ms({**extra_flags, **r["flags"]}, records, args.ms_per_step)
        if iters is None or ms is None:
            unknown.append(r["key"])
        else:
            total_ms += iters * ms
    hours = total_ms / len(slots) / 3.6e6
    if unknown:
        print(f"time estimate: unknown for {len(unknown)} runs (no --ms_per_step and no record with the same "
              f"flags, or no num_iterations)")
    else:
        print(f"time estimate: {hours:.2f} h on {len(slots)} parallel slot(s) (timed steps only; compile warm-up "
              "and validation come on top)")
    if args.budget_hours is not None and todo:
        if unknown:
            print(f"refusing to start: cannot check --budget_hours {args.budget_hours:g} without an estimate for "
                  f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}; pass --ms_per_step "
                  "(and --num_iterations in the grid or after --)", file=sys.stderr)
            return 2
        if hours > args.budget_hours:
            print(f"refusing to start: estimated {hours:.2f} h exceeds --budget_hours {args.budget_hours:g}",
                  file=sys.stderr)
            return 2

    commands = [(r, build_command(args.train_cmd, r, extra, args.nproc)) for r in todo]
    if args.dry_run:
        for r, cmd in commands:
            print(" ".join(shlex.quote(c) for c in cmd))
    elif todo:
        _save_state(state_path, state)
        _execute(commands, slots, state, state_path, records_dir / LOCAL_DIR / "sweeps" / name)
    if args.fit:
        fit_sweep(state, name, Path(args.fit_out) if args.fit_out else records_dir / "sweeps" / f"{name}_fit.png")
    failed = [k for k, v in state["runs"].items() if v.get("status") not in ("ok",)]
    if failed and not args.dry_run:
        print(f"{len(failed)} runs did not finish ok: {', '.join(failed)}; rerun the same command to retry "
              "crashed ones" + ("" if args.retry_failed else " (--retry_failed also reruns diverged ones)"))
    return 1 if any(state["runs"].get(r["key"], {}).get("status") == "error" for r in todo) else 0


def _sweep_status(summary):
    """"ok", "failed" (finished but diverged: a full summary, final_val_loss null) or "error" (crashed or killed: no
    summary, or the short summary train_gpt.py prints on an exception, which has no final_val_loss). Only "error"
    runs are retried by default; a summary means the run finished even if the process then exited nonzero."""
    if not summary:
        return "error"
    status = summary.get("status", "ok")
    return "error" if status != "ok" and "final_val_loss" not in summary else status


def _execute(commands, slots, state, state_path, log_dir):
    """Run the commands, one per slot at a time; each slot is a list of GPU ids (or None: sequential, env as is)."""
    free, lock = queue.Queue(), threading.Lock()
    for s in slots:
        free.put(s)

    def work(i, run, cmd):
        slot = free.get()
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
            with lock:
                print(f"[{i + 1}/{len(commands)}] {' '.join(shlex.quote(c) for c in cmd)}"
                      + (f"  (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})" if slot else ""), flush=True)
            rc, summary = _run_one(cmd, env, log_dir / f"{run['key']}.log", f"[{run['key']}] ", lock)
        finally:
            free.put(slot)
        status = _sweep_status(summary)
        entry = dict(run, status=status, returncode=rc, summary=summary, record=(summary or {}).get("record"))
        with lock:
            state["runs"][run["key"]] = entry
            _save_state(state_path, state)
            print(f"[{run['key']}] {status} (exit {rc})" + (f", record {entry['record']}" if entry["record"] else ""))

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        for f in [pool.submit(work, i, r, c) for i, (r, c) in enumerate(commands)]:
            f.result()

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="print the records table (--write: also rewrite it in records/README.md)")
    t.add_argument("--write", action="store_true", help="rewrite the table between the markers of the README")
    t.add_argument("--records_dir", default="records")
    t.add_argument("--readme", default=None, help="default: <records_dir>/README.md")
    t.add_argument("--target", type=float, default=DEFAULT_TARGET)
    t.add_argument("--include_local", action="store_true", help="also list the smoke runs in records/local/")

    s = sub.add_parser("stats", help="t-test of final val losses against the target, or between two groups")
    s.add_argument("files", nargs="+", help="record files or directories (searched recursively)")
    s.add_argument("--vs", nargs="+", default=None, help="a second group: Welch t-test between the two")
    s.add_argument("--target", type=float, default=DEFAULT_TARGET)
    s.add_argument("--alpha", type=float, default=0.01)

    c = sub.add_parser("compare", help="plot val-loss curves of groups of runs against tokens and time")
    c.add_argument("groups", nargs="+", help="each a record file or a directory of runs")
    c.add_argument("--out", required=True)
    c.add_argument("--labels", default=None, help="comma-separated, one per group")
    c.add_argument("--zoom", type=float, default=0.3, help="plot the final fraction of the x range")
    c.add_argument("--band", choices=("minmax", "std", "none"), default="minmax")
    c.add_argument("--subject", default="", help="comma-separated hparams the comparison is about (no warning)")
    c.add_argument("--target", type=float, default=DEFAULT_TARGET)

    w = sub.add_parser("sweep", help="run a grid of flags x seeds; resumable; optional scaling-law fit",
                       description="Arguments after a lone -- are passed to every run.")
    w.add_argument("--grid", action="append", default=[], help="name=v1,v2 (repeatable)")
    w.add_argument("--seeds", default="0")
    w.add_argument("--sweep_name", default=None, help="default: sweep_<hash of grid and extra flags>")
    w.add_argument("--records_dir", default="records")
    w.add_argument("--train_cmd", default="python train_gpt.py")
    w.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    w.add_argument("--gpus_per_run", type=int, default=None, help="default: --nproc")
    w.add_argument("--gpus", type=int, default=None,
                   help="GPUs to spread runs over (default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    w.add_argument("--budget_hours", type=float, default=None)
    w.add_argument("--ms_per_step", type=float, default=None,
                   help="default: mean step_avg of the records with the same flags")
    w.add_argument("--dry_run", action="store_true")
    w.add_argument("--retry_failed", action="store_true", help="rerun runs that ended with status failed")
    w.add_argument("--fit", action="store_true", help="fit L(N, D) = E + A/N^a + B/D^b to the ok runs")
    w.add_argument("--fit_out", default=None, help="default: <records_dir>/sweeps/<sweep_name>_fit.png")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if extra and args.command != "sweep":
        print("error: arguments after -- are only used by sweep", file=sys.stderr)
        return 2
    if args.command == "table":
        return cmd_table(args)
    if args.command == "stats":
        return cmd_stats(args)
    if args.command == "compare":
        return cmd_compare(args)
    try:
        return run_sweep(args, extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
