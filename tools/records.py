"""Read, summarize and compare run records (`records/<track>/<date>_<run_name>/<uuid>.txt`).

    python tools/records.py table   [--records_dir records] [--target 3.28] [--include_local] [--write]
    python tools/records.py stats   FILES... [--target 3.28] [--alpha 0.01] [--vs FILES...]
    python tools/records.py compare A B ... --out plot.png [--labels a,b] [--zoom 0.3] [--subject flag,...]

Sweeps (a grid of flags x seeds, producing records) are tools/sweep.py, which imports this module; the old
`python tools/records.py sweep ...` still works: it names the new command on stderr and runs it.

A record file is what train_gpt.py writes for one run: the sources, the environment, the hyperparameters
(`hparams: {json}` and `flags: {json}`), then the log (`step:N/T ...` lines, peak memory, and a final
`summary: {json}` line). A run with a summary is "ok" or "failed" (summary["status"]); one without is "incomplete".
"""

import argparse
import glob
import importlib.util
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TARGET = 3.28
TABLE_START = "<!-- records-table:start -->"
TABLE_END = "<!-- records-table:end -->"
# Sub-directories of records/ that hold no run records (benchmarks, sweep state) or are git-ignored smoke runs.
NON_RUN_DIRS = ("kernels", "sweeps")
LOCAL_DIR = "local"
# How a run that is not "ok" ended: diverged (failed), stopped by a signal and never resumed (interrupted), or
# killed without a word (incomplete).
NOT_OK = ("failed", "interrupted", "incomplete")
# Hyperparameters that differ from run to run, or are bookkeeping that cannot change what is trained or measured
# (where records and checkpoints go, how often checkpoints are written, which checkpoint a segment resumed from):
# never reported as confounds, ignored when matching a sweep cell to earlier records, hidden in the table.
PER_RUN_KEYS = {"seed", "run_name", "run_id", "uuid", "date", "git_commit", "record", "records_dir", "track",
                "save_checkpoint", "save_every", "keep_checkpoints", "resume"}
# Validation is off the training path (no gradients, no training data, not timed), so val_every changes how many
# points a curve has, not the training or the final loss; compare marks every validation point, so unequal
# resolutions are visible in the figure rather than reported as a confound. val_tokens does change the measured
# number (a different slice of the val set) and stays a confound.
MEASUREMENT_ONLY_KEYS = {"val_every"}
# Checkpoint paths: which file differs from run to run (one teacher per seed, a new decomposition), so only whether
# one is set is compared (starting from a checkpoint or not is a real difference).
PATH_KEYS = {"init_from", "teacher"}
# Flags not shown in the table's flags column (seed varies inside a group; track and run name have their own columns).
HIDDEN_FLAGS = PER_RUN_KEYS

# -----------------------------------------------------------------------------
# Parsing record files

_HEADER = re.compile(r"^={20} (.+?) ={20}$")
_STEP = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+):(\S+)")
_PEAK = re.compile(r"^peak memory (?:allocated|\(max RSS\)): (\d+(?:\.\d+)?) MiB")  # GPU, or CPU runs
_SUMMARY = re.compile(r"summary: (\{.*\})\s*$")
_RESUMED_AT = re.compile(r"^resumed from (.+) at step (\d+)\b")
# Checkpoints are written beside their record: <stem>_step<N>.pt, <stem>_step<N>_interrupted.pt, <stem>_final.pt.
_CHECKPOINT_NAME = re.compile(r"^(?P<stem>.+?)_(?:step(?P<step>\d+)(?:_interrupted)?|final)\.pt$")


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
    resume_step: int | None = None  # the "resumed from ... at step N" line of a resumed segment
    segments: tuple = ()  # the record files of a run joined across resumes, in order (empty: just `path`)

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
        """(step, tokens, train_time_ms, val_loss) at every validation, in log order. Tokens from the line's
        `tokens:` field (staged runs change tokens per step), else step x tokens_per_step (older records)."""
        tps = self.tokens_per_step or 0
        return [(s["step"], int(s.get("tokens", s["step"] * tps)), s["train_time_ms"], s["val_loss"])
                for s in self.steps if "val_loss" in s]

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

    @property
    def seed(self):
        seed = self.hparams.get("seed", self._from_summary("seed"))
        return None if seed is None else int(seed)

    @property
    def resumed_from(self):
        """The checkpoint this segment continued (summary, else the --resume flag of a segment that never finished)."""
        return self._from_summary("resumed_from") or self.hparams.get("resume") or self.flags.get("resume") or None

    @property
    def record_files(self):
        return self.segments or (self.path,)


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
    steps, summary, reason, peak, resume_step = [], None, None, None, None
    if "log" in sections:
        a, b = sections["log"]
        for line in lines[a:b]:
            if (entry := _parse_step(line)) is not None:
                steps.append(entry)
            elif (m := _RESUMED_AT.match(line)):
                resume_step = int(m.group(2))
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
    return Run(path, hparams, flags, steps, summary, status, reason, env, peak, resume_step)


def _expand(paths):
    """Paths as given, with quoted glob patterns ('records/track_1_short/*_baseline') expanded here, so that one
    command-line argument can name all the folders of one group."""
    out = []
    for p in map(str, paths):
        matches = sorted(glob.glob(p)) if glob.has_magic(p) and not Path(p).exists() else [p]
        out += matches or [p]
    return [Path(p) for p in out]


def find_record_files(paths, skip_dirs=NON_RUN_DIRS):
    """Record .txt files under the given files/directories/glob patterns; directories are searched recursively,
    skipping any sub-directory named in skip_dirs (relative to the directory given)."""
    files = []
    for p in _expand(paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*.txt")
                            if not set(f.relative_to(p).parts[:-1]) & set(skip_dirs))
        else:
            raise FileNotFoundError(f"no such record file or directory: {p}")
    return files


def load_runs(paths, skip_dirs=NON_RUN_DIRS, join=True):
    """Parse every record under paths; with join, segments of a resumed run become one run (join_resumed).
    Unparseable files are reported on stderr, never dropped silently."""
    runs = []
    for f in find_record_files(paths, skip_dirs):
        try:
            runs.append(parse_record(f))
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return join_resumed(runs) if join else runs

# -----------------------------------------------------------------------------
# Resumed runs: a run continued with --resume writes a new record (a segment) whose summary names the checkpoint
# it continued (resumed_from); the checkpoint lies beside its own record, so the parent record is
# <checkpoint dir>/<stem>.txt. The segments of one run are joined into one Run, so that n, std and the curves count
# runs, not segments.


def checkpoint_record_stem(checkpoint):
    """'<dir>/<stem>_step500.pt' (also _step500_interrupted.pt, _final.pt) -> '<stem>'; None for another name."""
    m = _CHECKPOINT_NAME.match(Path(str(checkpoint)).name)
    return m.group("stem") if m else None


def _try_parse(path):
    try:
        return parse_record(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _find_parent(child):
    """The parent record of a resumed segment, read from disk: beside the checkpoint as given (relative to the
    directory the run started in, normally the repo root), else in any folder of the child's track."""
    stem = checkpoint_record_stem(child.resumed_from)
    if stem is None:
        return None
    given = Path(child.resumed_from).with_name(stem + ".txt")
    for candidate in [given, child.path.parent / given.name, *sorted(child.path.parent.parent.glob(f"*/{stem}.txt"))]:
        if (parent := _try_parse(candidate)) is not None:
            return parent
    return None


def _find_children(run, known, cache):
    """Segments resumed from run's checkpoints that were not loaded: a run resumed on another day writes into
    <track>/<later date>_<same run_name>/, so sibling folders with the same run name are searched (each once)."""
    key = (run.path.parent.parent, run.run_name)
    if key not in cache:
        same_name = re.compile(r"^\d{4}-\d{2}-\d{2}_" + re.escape(run.run_name) + "$")
        folders = [d for d in sorted(key[0].iterdir()) if d.is_dir() and same_name.match(d.name)] \
            if key[0].is_dir() else []
        cache[key] = [seg for folder in folders for f in sorted(folder.glob("*.txt")) if f.resolve() not in known
                      if (seg := _try_parse(f)) is not None and seg.resumed_from]
    return [seg for seg in cache[key] if checkpoint_record_stem(seg.resumed_from) == run.path.stem]


def _cut_step(parent, child):
    """The step at which child continued parent: its log line, else the checkpoint name, else parent's last step
    (a resume from <stem>_final.pt)."""
    if child.resume_step is not None:
        return child.resume_step
    m = _CHECKPOINT_NAME.match(Path(str(child.resumed_from)).name)
    if m and m.group("step"):
        return int(m.group("step"))
    return parent.steps[-1]["step"] if parent.steps else 0


def _join_chain(chain):
    """One Run from segments [first, ..., last]: each segment's steps up to where the next one took over, then the
    next one's; status, summary and flags from the last segment (its train_time and tokens count from step 0)."""
    steps = list(chain[0].steps)
    for parent, child in zip(chain, chain[1:]):
        cut = _cut_step(parent, child)
        steps = [s for s in steps if s["step"] <= cut]
        val_at_cut = any(s["step"] == cut and "val_loss" in s for s in steps)
        # the child validates again at the step it resumed at when that is a validation step: the same weights
        steps += [s for s in child.steps if s["step"] > cut or (s["step"] == cut and "val_loss" in s
                                                                and not val_at_cut)]
    last = chain[-1]
    peaks = [r.peak_memory_mib for r in chain if r.peak_memory_mib is not None]
    return Run(chain[0].path, last.hparams, last.flags, steps, last.summary, last.status, last.reason,
               last.environment, max(peaks) if peaks else None, last.resume_step,
               tuple(p for r in chain for p in r.record_files))


def _progress(run):
    return (run.status == "ok", run.num_steps)


def never_trained(parent, child):
    """Whether child, a segment resumed from parent's checkpoint, ended without training a step: not ok, and no step
    line past the step it resumed at (a resume that died on loading: a shape mismatch, a missing shard)."""
    cut = _cut_step(parent, child)
    return child.status != "ok" and not any(s["step"] > cut for s in child.steps)


def join_resumed(runs):
    """Join resumed segments into whole runs. A parent missing from runs is read from disk (beside its checkpoint)
    and so are children in sibling folders; a segment whose parent cannot be found counts as a run of its own, with
    a warning. When several segments continued the same parent, the branch that got furthest is kept. A segment
    that never trained (never_trained: a resume that died while loading) is ignored with a warning, and a run that
    finished ok is never replaced by a continuation that got less far, so neither can demote a finished run."""
    known = {r.path.resolve(): r for r in runs}
    pending, cache = list(runs), {}
    while pending:  # pull in missing parents and children until nothing new turns up (chains of resumes)
        added = []
        for r in pending:
            if r.resumed_from and not any(k.stem == checkpoint_record_stem(r.resumed_from) for k in known):
                if (parent := _find_parent(r)) is not None:
                    added.append(parent)
            added += _find_children(r, known, cache)
        pending = []
        for r in added:
            if r.path.resolve() not in known:
                known[r.path.resolve()] = r
                pending.append(r)
    all_runs = sorted(known.values(), key=lambda r: str(r.path))
    by_stem = {r.path.stem: r for r in all_runs}
    children = {}
    roots = []
    for r in all_runs:
        parent = by_stem.get(checkpoint_record_stem(r.resumed_from)) if r.resumed_from else None
        if parent is None:
            if r.resumed_from:
                print(f"warning: {r.path} resumed from {r.resumed_from}, whose record was not found; counted as a "
                      f"run of its own from step {r.resume_step if r.resume_step is not None else '?'} (pass the "
                      "parent's folder too, or keep the record beside its checkpoint)", file=sys.stderr)
            roots.append(r)
        else:
            children.setdefault(parent.path, []).append(r)

    def best_chain(run):
        chains = []
        for chain in (best_chain(c) for c in children.get(run.path, [])):
            if all(never_trained(p, c) for p, c in zip([run] + chain, chain)):
                print(f"warning: {chain[0].path} resumed from {chain[0].resumed_from} but never trained a step "
                      f"(status {chain[-1].status}{': ' + chain[-1].reason if chain[-1].reason else ''}); ignored, "
                      f"{run.path} counts as it stands", file=sys.stderr)
            elif run.status == "ok" and _progress(chain[-1]) < _progress(run):
                print(f"warning: {chain[0].path} continues {run.path}, which finished ok, but got less far "
                      f"(status {chain[-1].status} at step {chain[-1].num_steps}); not counted", file=sys.stderr)
            else:
                chains.append(chain)
        if not chains:  # a finished parent is never demoted by a continuation that did not get as far
            return [run]
        chains.sort(key=lambda c: _progress(c[-1]), reverse=True)
        for dropped in chains[1:]:
            print(f"warning: {dropped[0].path} and {chains[0][0].path} both continue {run.path}; joined the one "
                  f"that got further, the other is not counted", file=sys.stderr)
        return [run] + chains[0]

    joined = []
    for root in roots:
        chain = best_chain(root)
        joined.append(chain[0] if len(chain) == 1 else _join_chain(chain))
    return joined

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
        counts = {s: sum(r.status == s for r in group) for s in NOT_OK}
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


def duplicate_seeds(groups):
    """[(group label, seed, [paths])] for every seed that occurs in more than one ok run of a group with the same
    comparable hyperparameters. Such runs are not independent samples (a resumed run recorded twice, or a rerun of
    the same config and seed), so they would make n too large and std too small."""
    found = []
    for label, runs in groups.items():
        seen = {}
        for r in runs:
            if r.status == "ok" and r.final_val_loss is not None and r.seed is not None:
                config = json.dumps({k: _canon(v) for k, v in _comparable(r).items()}, sort_keys=True)
                seen.setdefault((r.seed, config), []).append(r.path)
        found += [(label, seed, paths) for (seed, _), paths in sorted(seen.items(), key=lambda kv: kv[0][0])
                  if len(paths) > 1]
    return found


def warn_duplicate_seeds(groups):
    for label, seed, paths in duplicate_seeds(groups):
        files = ", ".join(map(str, paths))
        print(f"warning: {label}: {len(paths)} ok runs with seed {seed} and the same flags ({files}); they are not "
              "independent samples, so n and std are off: rerun one with another seed, or move the duplicate out "
              "of the group", file=sys.stderr)


LOCAL_README_HEAD = """# Local runs

Runs on a CPU (smoke runs, debugging) write their records under `records/local/`, which git ignores; their table
is kept here, never in the tracked `records/README.md`. `python tools/records.py table --write --include_local`
rewrites it (and the tracked table, without these rows).

"""


def _under(path, folder):
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def write_table(readme, table, n_runs, create=False):
    """Put table between the markers of readme (bytes in and out, so that line endings outside the markers survive
    unchanged). create: a missing readme is created with LOCAL_README_HEAD and the markers. Returns 0, or 1 after
    printing one error line."""
    if not readme.exists():
        if not create:
            print(f"error: {readme} does not exist; create it with the lines {TABLE_START} and {TABLE_END}",
                  file=sys.stderr)
            return 1
        readme.write_text(f"{LOCAL_README_HEAD}{TABLE_START}\n{TABLE_END}\n", encoding="utf-8")
    try:
        new = replace_between_markers(readme.read_bytes().decode("utf-8"), table)
        readme.write_bytes(new.encode("utf-8"))
    except ValueError as e:
        print(f"error: {readme}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot rewrite {readme} ({e.strerror}); check its permissions", file=sys.stderr)
        return 1
    print(f"wrote the table ({n_runs} runs) to {readme}")
    return 0


def cmd_table(args):
    """Print the table (with --include_local also the runs under records/local/). --write rewrites the tracked
    README's table with the tracked runs only, whatever --include_local says: local (CPU) runs never land in the
    tracked tree. With --include_local, --write also rewrites records/local/README.md (git-ignored, created if
    missing) with the local runs."""
    records_dir = Path(args.records_dir)
    if not records_dir.is_dir():
        print(f"error: --records_dir {records_dir} is not a directory; run from the repository root or pass "
              "--records_dir <the folder train_gpt.py writes records into>", file=sys.stderr)
        return 1
    local_dir = records_dir / LOCAL_DIR
    skip = NON_RUN_DIRS + (() if args.include_local else (LOCAL_DIR,))
    runs = load_runs([records_dir], skip)
    warn_duplicate_seeds({f"{track}/{folder}": group for (track, folder), group in group_runs(runs).items()})
    print(format_table(table_rows(runs, args.target), args.target))
    if not args.write:  # printing never dirties the tree (a later run would record git_commit ...-dirty)
        return 0
    local = [r for r in runs if _under(r.path, local_dir)]
    tracked = [r for r in runs if not _under(r.path, local_dir)]
    readme = Path(args.readme) if args.readme else records_dir / "README.md"
    rc = write_table(readme, format_table(table_rows(tracked, args.target), args.target), len(tracked))
    if rc or not args.include_local:
        return rc
    if not local_dir.is_dir():
        print(f"no local runs ({local_dir} does not exist); no local table written")
        return 0
    return write_table(local_dir / "README.md", format_table(table_rows(local, args.target), args.target),
                       len(local), create=True)

# -----------------------------------------------------------------------------
# stats


def _ok_losses(runs, label):
    ok = [r.final_val_loss for r in runs if r.status == "ok" and r.final_val_loss is not None]
    others = {s: sum(r.status == s for r in runs) for s in NOT_OK}
    excluded = ", ".join(f"{n} {s}" for s, n in others.items() if n)
    print(f"{label}: {len(runs)} runs, {len(ok)} ok" + (f" (excluded: {excluded})" if excluded else ""))
    return ok


def _load_group(paths, flag=""):
    """load_runs(paths), or None after one error line (a missing path, or no record file at all)."""
    try:
        runs = load_runs(paths)
    except FileNotFoundError as e:
        print(f"error: {flag}{e} (give record files, run folders or quoted globs such as "
              "'records/track_1_short/*_baseline')", file=sys.stderr)
        return None
    if not runs:
        print(f"error: {flag}no record files in {' '.join(map(str, paths))} (a run folder holds <uuid>.txt "
              "records)", file=sys.stderr)
        return None
    return runs


def cmd_stats(args):
    groups = []
    for label, paths, flag in (("A", args.files, ""), ("B", args.vs, "--vs: ")):
        if paths:
            if (runs := _load_group(paths, flag)) is None:
                return 1
            groups.append((label, runs))
    warn_duplicate_seeds({f"group {label}": runs for label, runs in groups})
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
    """A group's val loss at its validation points, against tokens or seconds of timed training. The mean, band and
    std are over runs at the validation steps all runs share (x: the runs' mean x there); `runs` holds each run's
    own points (x, loss arrays). interpolated: the runs validated at different steps, so the mean is taken on
    values interpolated between each run's points (in steps) and is drawn without markers."""
    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    std: np.ndarray
    runs: list
    interpolated: bool = False


def group_curve(runs, axis):
    """The Curve of a group of runs on axis "tokens" or "time" (seconds); None without a run that has two or more
    finite validation points."""
    per_run = []  # (steps, x, loss) of each run's finite validation points
    for r in runs:
        pts = [(step, tok if axis == "tokens" else t / 1000, loss)
               for step, tok, t, loss in r.val_points if math.isfinite(loss)]
        if len(pts) >= 2:
            per_run.append(np.array(pts, dtype=float).T)
    if not per_run:
        return None
    shared = sorted(set.intersection(*(set(p[0]) for p in per_run)))
    # e.g. val_every 4 and 5 share only the first and the last step: too few for a curve, so interpolate
    interpolated = len(shared) < max(2, (min(len(p[0]) for p in per_run) + 1) // 2)
    if interpolated:  # different validation steps: the union of steps inside the range every run covers
        lo_s, hi_s = max(p[0].min() for p in per_run), min(p[0].max() for p in per_run)
        steps = np.unique(np.concatenate([p[0] for p in per_run]))
        steps = steps[(steps >= lo_s) & (steps <= hi_s)]
    else:
        steps = np.array(shared, dtype=float)
    xs = np.stack([np.interp(steps, p[0], p[1]) for p in per_run])  # exact at shared steps
    ys = np.stack([np.interp(steps, p[0], p[2]) for p in per_run])
    return Curve(xs.mean(0), ys.mean(0), ys.min(0), ys.max(0), ys.std(0), [(p[1], p[2]) for p in per_run],
                 interpolated)


def _comparable(run):
    """The hyperparameters that define what a run trains and measures (see PER_RUN_KEYS and friends)."""
    d = {k: v for k, v in run.hparams.items() if k not in PER_RUN_KEYS | MEASUREMENT_ONLY_KEYS}
    for key in PATH_KEYS & set(d):
        d[key] = "<a checkpoint>" if d[key] else ""
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
        print(f"note: {label} has no ok runs; plotting its {len(runs)} failed/interrupted/incomplete runs",
              file=sys.stderr)
    return ok or runs


def _labels(paths, given):
    if given:
        labels = given.split(",") if isinstance(given, str) else list(given)
        if len(labels) != len(paths):
            raise ValueError(f"--labels has {len(labels)} names for {len(paths)} groups")
        return labels
    labels = []
    for p in map(Path, paths):
        label = p.name if p.is_dir() or glob.has_magic(str(p)) else f"{p.parent.name}/{p.stem[:8]}"
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


AXIS_NAMES = {"tokens": "tokens", "time": "timed training (s)"}


def _fmt_x(axis, x):
    return _fmt_tokens(x) if axis == "tokens" else f"{x:.1f} s"


def zoom_window(curves, labels, axis, zoom):
    """(x_lo, x_hi, warnings): the last `zoom` of the x range all curves span. A group with no validation point in
    it (it ended earlier, e.g. a faster arm on the time axis) gets a warning, and the window is widened to its last
    two points (one point shows no trend), so that no group silently drops out of the zoomed panel."""
    x_hi = max(max(float(x[-1]) for x, _ in c.runs) for c in curves)
    x_lo = start = x_hi * (1 - zoom)
    warnings = []
    for label, c in zip(labels, curves):
        last = max(float(x[-1]) for x, _ in c.runs)
        if last < start:
            x_lo = min(x_lo, float(c.x[-2] if len(c.x) > 1 else c.x[-1]))
            warnings.append(f"{label} has no validation point in the last {zoom:.0%} of the {axis} axis (it ends at "
                            f"{_fmt_x(axis, last)}, the window starts at {_fmt_x(axis, start)}); the zoomed "
                            f"{axis} panel is widened to start at {_fmt_x(axis, x_lo)} to include it")
    margin = 0.02 * (x_hi - x_lo)
    return x_lo - margin, x_hi + margin, warnings


def _visible_values(curves, x_lo, x_hi, band, edges=True):
    """Every loss value drawn inside [x_lo, x_hi]: points inside, and (edges) where a line crosses an edge, its
    value there, for the mean, the band and each run's points."""
    values = []

    def add(x, y):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        inside = (x >= x_lo) & (x <= x_hi)
        values.extend(y[inside])
        for edge in (x_lo, x_hi) if edges else ():
            if x[0] < edge < x[-1]:
                values.append(float(np.interp(edge, x, y)))
    for c in curves:
        add(c.x, c.mean)
        if band != "none":
            lo, hi = _band(c, band)
            add(c.x, lo)
            add(c.x, hi)
        for x, y in c.runs:
            add(x, y)
    return np.array(values)


def _band(curve, band):
    return (curve.lo, curve.hi) if band == "minmax" else (curve.mean - curve.std, curve.mean + curve.std)


def _draw(ax, curves, labels, band, n_runs):
    colors = [f"C{i}" for i in range(len(curves))]
    for label, c, color, n in zip(labels, curves, colors, n_runs):
        for x, y in c.runs:  # each run's validation points: the data the mean line is made of
            ax.plot(x, y, ls="none", marker=".", ms=4, alpha=0.45, color=color)
        ax.plot(c.x, c.mean, color=color, lw=1.6, marker=None if c.interpolated else "o", ms=4,
                label=f"{label} (mean of {n} run{'s' if n != 1 else ''})")
        if band != "none" and n > 1:
            lo, hi = _band(c, band)
            ax.fill_between(c.x, lo, hi, color=color, alpha=0.15, lw=0)


def plot_compare(curves_by_axis, labels, out, zoom, band, target, n_runs):
    """Full-range panels (top) and zoomed panels (bottom) of val loss vs tokens and vs timed training. The zoomed
    y-limits come from everything drawn inside the window. Returns {"warnings": the zoom-window warnings,
    "zoom": {axis: (xlim, ylim)}, "full": {axis: ylim}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    drawn = {"warnings": [], "zoom": {}, "full": {}}
    for col, (axis, curves) in enumerate(curves_by_axis.items()):
        full, zoomed = axes[0, col], axes[1, col]
        x_lo, x_hi, warn = zoom_window(curves, labels, axis, zoom)
        drawn["warnings"] += warn
        for ax in (full, zoomed):
            _draw(ax, curves, labels, band, n_runs)
            if axis == "tokens":
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _fmt_tokens(max(v, 0))))
            ax.set_xlabel(AXIS_NAMES[axis])
            ax.set_ylabel("val loss")
            ax.grid(alpha=0.3)
        full.axvspan(x_lo, x_hi, color="gray", alpha=0.08, lw=0)  # where the zoomed panel below looks
        # The first validations (10.8 at step 0) would squash the rest of the run into a line at the bottom: the
        # y-axis starts from the points after the first 5% of the x range, and says so when it cuts one off.
        x_end = max(c.x[-1] for c in curves)
        later = _visible_values(curves, 0.05 * x_end, x_end, band, edges=False)
        clipped = ""
        if later.size:
            everything = _visible_values(curves, -math.inf, math.inf, band)
            pad = 0.05 * (later.max() - later.min() or 0.01)
            full.set_ylim(later.min() - pad, later.max() + pad)
            if everything.max() > later.max() + pad:
                clipped = f" (y cut at {later.max() + pad:.2f}; earlier points up to {everything.max():.2f})"
        full.set_title(f"val loss vs {AXIS_NAMES[axis]}: whole run{clipped}", fontsize=10)
        zoomed.set_xlim(x_lo, x_hi)
        vis = _visible_values(curves, x_lo, x_hi, band)
        if vis.size:
            pad = 0.08 * (vis.max() - vis.min() or 0.01)
            zoomed.set_ylim(vis.min() - pad, vis.max() + pad)
        zoomed.set_title(f"zoom: {_fmt_x(axis, x_lo)} to {_fmt_x(axis, x_hi)} (y from the curves in the window)",
                         fontsize=10)
        for ax in (full, zoomed):  # the target only where it is in view: a legend entry for an unseen line misleads
            if ax.get_ylim()[0] <= target <= ax.get_ylim()[1]:
                ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target:g}")
        full.legend(fontsize=8)
        drawn["zoom"][axis] = (zoomed.get_xlim(), zoomed.get_ylim())
        drawn["full"][axis] = full.get_ylim()
    band_text = {"minmax": "min-max over runs", "std": "mean +- 1 std over runs", "none": "none"}[band]
    fig.suptitle(f"lines: mean over runs at the validation steps they share (circles); dots: each run's "
                 f"validation points\nband: {band_text}; shaded in the top panels: the zoomed window below",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def unwritable_figure(out, flag="--out"):
    """Why matplotlib could not save a figure at out (an unknown format, a missing directory, a path that cannot be
    created), or None; checked by creating the file (removed again if it was not there before)."""
    from matplotlib.backend_bases import FigureCanvasBase
    out = Path(out)
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        return (f"{flag} {out}: matplotlib cannot write {out.suffix} files; end the name in one of "
                f"{', '.join('.' + f for f in sorted(formats))}")
    if out.is_dir():
        return f"{flag} {out} is a directory; give a file name such as {out / 'cmp.png'}"
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        return f"{flag} {out}: {out.parent} {what}; create the directory or choose another path"
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as e:
        return f"{flag} {out} cannot be written ({e.strerror}); choose another path"
    if not existed:
        out.unlink(missing_ok=True)
    return None


def cmd_compare(args):
    try:
        labels = _labels(args.groups, args.labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not 0 < args.zoom <= 1:
        print(f"error: --zoom {args.zoom:g} must be in (0, 1]: the fraction of the x range the zoomed panels show",
              file=sys.stderr)
        return 1
    if (why := unwritable_figure(args.out)) is not None:  # before any work: the plot is the point of the command
        print(f"error: {why}", file=sys.stderr)
        return 1
    try:
        groups = [load_runs([g]) for g in args.groups]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for label, runs in zip(labels, groups):
        if not runs:
            print(f"error: no record files in {label}", file=sys.stderr)
            return 1
    seen = {}  # record file -> the group it is in: a run in two groups is compared with itself
    for label, runs in zip(labels, groups):
        for r in runs:
            other = {seen.setdefault(f.resolve(), label) for f in r.record_files} - {label}
            if other:
                print(f"WARNING: the run {r.path} is in both {other.pop()} and {label} (a resumed run is one run: "
                      "give all the folders of one arm as one quoted glob, e.g. 'records/<track>/*_my_idea')",
                      file=sys.stderr)
    subject = [s for s in (args.subject or "").split(",") if s]
    diffs = hparam_differences(groups, subject)
    if diffs:
        print(f"WARNING: the compared groups differ in hyperparameters other than the subject "
              f"(--subject {','.join(subject) or '<none>'}); differences may be confounded:", file=sys.stderr)
        for key, vals in diffs:
            print("WARNING:   " + key + ": " + "  ".join(f"{l}={v}" for l, v in zip(labels, vals)), file=sys.stderr)
    selected = [_selected(runs, label) for label, runs in zip(labels, groups)]
    curves = {axis: [group_curve(runs, axis) for runs in selected] for axis in ("tokens", "time")}
    missing = [l for l, c in zip(labels, curves["tokens"]) if c is None]
    if missing:
        print(f"error: {', '.join(missing)}: no run with two or more validation points (runs with --val_every=0 "
              "validate only at the end; rerun with --val_every set)", file=sys.stderr)
        return 1
    for label, c in zip(labels, curves["tokens"]):
        if c.interpolated:
            print(f"note: the runs of {label} validated at different steps; its mean line is interpolated "
                  "between their points (drawn without circles)", file=sys.stderr)
    try:
        drawn = plot_compare(curves, labels, args.out, args.zoom, args.band, args.target,
                             [len(runs) for runs in selected])
    except OSError as e:  # written to moments ago, so only a full disk or a race gets here
        print(f"error: could not write --out {args.out} ({e.strerror or e}); free space or choose another path",
              file=sys.stderr)
        return 1
    for w in drawn["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"wrote {args.out}")
    for axis in ("tokens", "time"):
        cs = curves[axis]
        common = min(c.x[-1] for c in cs)
        xs = np.linspace(common * (1 - args.zoom), common, 4)
        print(f"\nval loss at equal {axis}, linear between validation points (difference vs {labels[0]}):")
        print(f"  {axis:>10}  " + "  ".join(f"{l:>22}" for l in labels))
        for x in xs:
            ys = [float(np.interp(x, c.x, c.mean)) for c in cs]
            cells = [f"{ys[0]:.4f}"] + [f"{y:.4f} ({y - ys[0]:+.4f})" for y in ys[1:]]
            print(f"  {_fmt_x(axis, x):>10}  " + "  ".join(f"{c:>22}" for c in cells))
        ends = ", ".join(f"{l}={_fmt_x(axis, c.x[-1])}: {c.mean[-1]:.4f}" for l, c in zip(labels, cs))
        print(f"  last point: {ends}")
        reach = [_crossing(c, args.target) for c in cs]
        print(f"  reaches {args.target:g} at: " + ", ".join(
            f"{l}={_fmt_x(axis, x) if x is not None else 'never'}" for l, x in zip(labels, reach)))
    return 0

# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="print the records table (--write: also rewrite it in records/README.md)")
    t.add_argument("--write", action="store_true",
                   help="rewrite the table between the markers of the README (tracked runs only; with "
                        "--include_local the local runs go to <records_dir>/local/README.md)")
    t.add_argument("--records_dir", default="records")
    t.add_argument("--readme", default=None, help="default: <records_dir>/README.md")
    t.add_argument("--target", type=float, default=DEFAULT_TARGET)
    t.add_argument("--include_local", action="store_true",
                   help="also list the smoke / CPU runs in records/local/ (written to records/local/README.md, "
                        "never to the tracked table)")

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

    sub.add_parser("sweep", help="moved: python tools/sweep.py (this forwards there)", add_help=False)
    return p


def forward_sweep(argv):
    """`records.py sweep ARGS` (the sweep's old command line): say the new one, then run tools/sweep.py's main."""
    print("records.py sweep moved to tools/sweep.py: python tools/sweep.py " + " ".join(map(shlex.quote, argv)),
          file=sys.stderr)
    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).resolve().with_name("sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep.main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return forward_sweep(argv[1:])
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if extra:
        print("error: arguments after -- are only used by sweep", file=sys.stderr)
        return 2
    try:
        if args.command == "table":
            return cmd_table(args)
        if args.command == "stats":
            return cmd_stats(args)
        return cmd_compare(args)
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
