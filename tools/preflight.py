"""Preflight: prove a node in minutes before a paid run (issue 11).

    python tools/preflight.py                      # every check and measurement (GPU: under 10 minutes on one H100)
    python tools/preflight.py --quick              # under 3 minutes (a 2-core CPU: about 1): fewer cases and steps
    python tools/preflight.py --gpu_budget_s=480   # one 8-minute GPU call: most valuable first, stops in time
    torchrun --standalone --nproc_per_node=8 tools/preflight.py   # every GPU, plus NCCL all-reduce/all-gather
    python tools/preflight.py --flags="--mot=cross --seq_len=16384"  # the configuration you are about to run
    python tools/preflight.py --list               # what runs; --only=NAME,... runs a subset
    python tools/preflight.py --plan --gpu=h100 --nproc 8 --flags="--preset=frontier"   # memory plan, no GPU needed

It runs on whatever device is there: CUDA in the training dtype (bf16) at training sizes, else the CPU in fp32 at
smoke sizes (the smoke preset; every CPU timing is labeled as such and says nothing about a GPU).

Correctness checks, each against an independent reference on the device:
  env                   versions (torch, triton vs the one torch pins, CUDA, driver), GPU, memory held by others,
                        FP8 support; NCCL (gloo on CPU) all-reduce / all-gather round trips with known values
  flex_attention        compiled FlexAttention with the script's flex_block_mask vs dense SDPA under
                        dense_attention_mask (fp32, query chunk by chunk), forward and, on GPU, backward: packed
                        documents with boundaries mid-block, long/short windows (in --window_unit), MHA/GQA/MLA
                        head shapes, and the --mot=cross+self byte stream
  fp8_head              the lm_head's FP8 matmul (train_gpt.fp8_mm with FP8_HEAD_SCALES) forward and backward vs
                        fp32, at the real head shape (CPU --quick: 1024 of its rows): error bounded, all finite, no
                        e4m3/e5m2 saturation
  fp8_mlp               features/fp8_mlp.py's FP8MLP (--fp8_mlp) vs the fp32 relu^2 MLP, output and gradients, at
                        current and then delayed scales: error bounded, p not saturating at its delayed scale
  kron_ks_kernels       kernels.KronLinear (triton vs dense) and KSLinear (triton vs bmm) at the MLP shapes
  moe                   features/moe.py's MoE output, aux loss and gradients vs a per-expert loop
  compiled_training     N steps of train_step on a learnable synthetic stream along the real schedule (windows
                        grow; --stages: each stage's length), set up as main() does (StepSetup): finite falling
                        loss, graphs/recompiles/graph breaks, compiled == eager losses
  model_flex_forward    (CPU, not --quick) the model's forward through FlexAttention (FLEX_ATTENTION_ON_CPU,
                        inductor) vs its dense-mask forward
Measurements (median of repeats after warm-up; a variant that runs out of memory is reported, not fatal):
  step_time / fp8_off   ms/step, tokens/s, peak memory, MFU of the recipe (or --flags; --stages: per stage and
                        the step-weighted mean), the training time it implies, and with --fp8_head=false
  allreduce_bandwidth   NCCL bus bandwidth (world size > 1)
  kernel_bench          Kronecker and KS kernels vs the dense cuBLAS matmul (GPU)
  overhead_*            step-time overhead vs the default at equal tokens: --mot, --kron_mlp, --ks_mlp, GQA, MLA, MoE
  step_time_frontier    (not --quick) ms/step of --preset=frontier (CPU: frontier_smoke) with --flags, first stage
  peak_memory           (GPU) the timings' peak memory vs tools/memory_plan.py's plan of the same run
Measurements after step_time stop starting once --budget_s would be exceeded (they say so; --only=NAME runs
one on its own). --gpu_budget_s=S instead fits everything into one GPU call of S seconds counted from the
process's start: --quick sizes, every entry in the order of GPU_BUDGET_FIRST (GPU-only checks, ms/step of the
default and of the frontier's first stage, peak memory) and then the rest, each estimated before it starts
(GPU_BUDGET_COST_S, scaled up when the entries so far overran theirs) and skipped if it would not end in time; the
JSON's "skipped" and "gpu_budget" say what was left out and why.

Prints one line per check as it goes, then `preflight: {json}`; the same JSON and a Markdown table go to
records/preflight/<date>_<device>.json/.md (--out DIR; existing files are never overwritten). `ok` is true when
every check passed and no measurement crashed (`checks_ok` / `measurements_ok` separately). Exit code 0 when ok,
1 otherwise (each failure names the fix), 2 for bad arguments. Only rank 0 prints and writes; every rank runs
every check.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

IMPORTED_AT = time.perf_counter()  # before torch's import: process_age_s's fallback where /proc is missing
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_SHARED_TIKTOKEN = ROOT.parent / "shared" / "tiktoken_cache"  # our machines' offline GPT-2 BPE files (--mot)
if _SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED_TIKTOKEN))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.backends.registry import lookup_backend  # noqa: E402
from torch._dynamo.utils import counters as dynamo_counters  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import kernels  # noqa: E402
import features.fp8_mlp as fp8_mlp_feature  # noqa: E402
import features.moe as moe_feature  # noqa: E402
import features.mot as mot_feature  # noqa: E402
import train_gpt as tg  # noqa: E402

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, first match wins; MFU is "unknown" elsewhere.
PEAK_BF16_TFLOPS = [
    (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100|H800", 989.4), (r"H200", 989.4),
    (r"A100|A800", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0),
]
E4M3_MAX, E5M2_MAX, E5M2_TINY = 448.0, 57344.0, 2.0 ** -16  # float8 ranges (E5M2_TINY: smallest subnormal)
# Allowed error vs the reference: (relative Frobenius error, max |error| / max |reference|), by dtype and pass.
TOLERANCE = {
    torch.bfloat16: {"fwd": (1e-2, 3e-2), "bwd": (3e-2, 6e-2)},
    torch.float32: {"fwd": (1e-4, 1e-3), "bwd": (1e-4, 1e-3)},
}
# Relative error of the FP8 head vs fp32. e4m3 keeps 3 mantissa bits; measured on CPU (same conversions): 3.6% for
# the output, 6.5-6.7% for dx and dw at training-size gradients (e5m2 flushes ~20% of them to zero at init).
FP8_TOLERANCE = 0.15
OTHER_PROCESS_GIB = 4.0  # GPU memory in use before we allocate anything above this fails env (a stale process)
# --gpu_budget_s (one short GPU call) runs these first, in this order: what only a GPU can get wrong (its
# FlexAttention, FP8 and Triton kernels, the grouped-mm MoE, inductor's training step), then ms/step of the default
# and of the frontier preset's first stage, then peak memory against the plan; the rest follows in registry order.
GPU_BUDGET_FIRST = ("env", "flex_attention", "fp8_head", "fp8_mlp", "kron_ks_kernels", "moe", "compiled_training",
                    "step_time", "step_time_frontier", "peak_memory")
# Expected seconds of each entry on one H100 at --quick sizes, compiles included. GUESSES: nothing here has run on a
# GPU yet. Every result under --gpu_budget_s records its `estimate_s` next to its `seconds`: replace these from the
# first real run. Not listed (the overhead_* timings, each compiling its own model): GPU_BUDGET_OTHER_S.
GPU_BUDGET_COST_S = {
    "env": 5, "flex_attention": 60, "fp8_head": 5, "fp8_mlp": 20, "kron_ks_kernels": 20, "moe": 5,
    "compiled_training": 100,  # eager reference steps, then the compile that step_time reuses
    "step_time": 20,  # the timed steps alone, on compiled_training's model (STEP_TIME_COMPILE_S more without it)
    "step_time_frontier": 150, "peak_memory": 20,  # the plan: a meta-device model on the CPU, no GPU work
    "fp8_off": 90, "allreduce_bandwidth": 10, "kernel_bench": 30, "model_flex_forward": 5,
}
GPU_BUDGET_OTHER_S, STEP_TIME_COMPILE_S = 100, 60
GPU_BUDGET_RESERVE_S = 10  # kept free at the end: the report's files, the final line, leaving the process group


# -----------------------------------------------------------------------------------------------------------------
# Registry: every check and measurement is a named function of the Context, returning a one-line detail


class Skip(Exception):
    """The check does not apply here (the message says why); not a failure."""


class CheckFailed(Exception):
    """An expected failure mode; the message says what was wrong (the entry's fix says what to do)."""


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    kind: str  # "check" (correctness: any failure fails the node) or "measure"
    fix: str  # printed with a failure: what to do
    quick: bool = True  # runs under --quick
    budgeted: bool = True  # a measurement that --budget_s may skip


REGISTRY: list[Entry] = []


def check(name: str, fix: str, quick: bool = True):
    def register(fn):
        REGISTRY.append(Entry(name, fn, "check", fix, quick))
        return fn
    return register


def measurement(name: str, fix: str, quick: bool = True, budgeted: bool = True):
    def register(fn):
        REGISTRY.append(Entry(name, fn, "measure", fix, quick, budgeted))
        return fn
    return register


@dataclass
class Context:
    env: tg.DistEnv
    args: tg.Hyperparameters  # the base configuration: recipe defaults on GPU, the smoke preset on CPU, + --flags
    flags: list[str]
    quick: bool
    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    info: dict = field(default_factory=dict)  # environment facts for the report
    timings: dict = field(default_factory=dict)
    stash: dict = field(default_factory=dict)  # the compiled default model, handed from compiled_training to step_time
    estimate_s: float = 0.0  # expected cost of the next measurement (the costliest so far)
    gpu_budget_s: float | None = None  # --gpu_budget_s: each entry estimated before it starts, skipped if too long
    startup_s: float = 0.0  # the process's age when this Context was made (counted against --gpu_budget_s)
    budget_runs: list = field(default_factory=list)  # (table seconds, seconds taken) of each entry that ran
    budget_estimates: dict = field(default_factory=dict)  # entry name -> the estimate it was given

    @property
    def spent_s(self) -> float:
        """Seconds of the GPU call spent so far: the process's startup, then everything since."""
        return self.startup_s + time.perf_counter() - self.start

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def on_gpu(self) -> bool:
        return self.env.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.on_gpu else torch.float32

    def say(self, line: str):
        if self.env.master:
            print(line, flush=True)

    def progress(self, name: str, msg: str):
        self.say(f"    {name}: {msg}")

    def release(self):
        """Free what the last entry left behind: Python garbage, the CUDA cache, compiled graphs (unless stashed)."""
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
        if not self.stash:
            torch._dynamo.reset()


def run_entry(ctx: Context, entry: Entry) -> dict:
    """Run one entry; a failure is caught and recorded (message + traceback tail), never propagated."""
    t0 = time.perf_counter()
    cost = entry_cost_s(ctx, entry)  # before the entry runs: step_time's depends on the stash it takes
    try:
        over = over_budget(ctx, entry)
        if over:
            raise Skip(over)
        status, detail = "pass", entry.fn(ctx) or ""
    except Skip as e:
        status, detail = "skip", f"skipped: {e}"
    except (Exception, SystemExit) as e:  # SystemExit: train_gpt's config errors
        status, detail = "fail", describe_failure(e)
    finally:
        if entry.name != "compiled_training":
            ctx.stash.clear()  # its compiled model is handed only to the next entry (step_time)
        ctx.release()
    seconds = time.perf_counter() - t0
    if entry.kind == "measure" and status == "pass":
        ctx.estimate_s = max(ctx.estimate_s, seconds)
    status, detail = merge_ranks(ctx, status, detail)
    result = dict(name=entry.name, ok=status != "fail", status=status, detail=detail, seconds=round(seconds, 2))
    if status == "fail":
        result["fix"] = entry.fix
    if ctx.gpu_budget_s is not None:
        result["estimate_s"] = ctx.budget_estimates.get(entry.name)
        if status != "skip":  # a skip takes no time: it says nothing about how fast this machine is
            ctx.budget_runs.append((cost, seconds))
    ctx.say(result_line(result))
    return result


def over_budget(ctx: Context, entry: Entry) -> str | None:
    """Why this entry would overrun the time budget, or None: under --gpu_budget_s any entry (over_gpu_budget),
    else a measurement past --budget_s. Rank 0 decides for all: a rank that skipped an entry while the others ran
    it would leave them waiting in its collectives."""
    if ctx.gpu_budget_s is not None:
        reason = over_gpu_budget(ctx, entry)
    elif entry.kind != "measure" or not entry.budgeted:
        return None
    else:
        elapsed = time.perf_counter() - ctx.start
        reason = None
        if elapsed + ctx.estimate_s > ctx.budget_s:
            reason = (f"time budget: {elapsed:.0f}s elapsed of --budget_s={ctx.budget_s:.0f} and a measurement "
                      f"takes ~{ctx.estimate_s:.0f}s here; raise --budget_s or run --only={entry.name}")
    if ctx.env.world_size > 1:
        box = [reason]
        dist.broadcast_object_list(box, src=0)
        reason = box[0]
    return reason


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc), else since this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields 3.. of proc(5)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start, in clock ticks
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED_AT


def entry_cost_s(ctx: Context, entry: Entry) -> float:
    """The entry's expected seconds from GPU_BUDGET_COST_S; step_time's include its own compile when
    compiled_training left no compiled model to reuse."""
    cost = GPU_BUDGET_COST_S.get(entry.name, GPU_BUDGET_OTHER_S)
    if entry.name == "step_time" and "model" not in ctx.stash:
        cost += STEP_TIME_COMPILE_S
    return cost


def budget_scale(runs: list[tuple[float, float]]) -> float:
    """How much slower than their GPU_BUDGET_COST_S the entries run so far took (seconds taken / expected, summed),
    never below 1: an entry that overruns a call's hard limit costs the whole report, one skipped only itself."""
    expected = sum(cost for cost, _ in runs)
    return max(1.0, sum(seconds for _, seconds in runs) / expected) if expected else 1.0


def over_gpu_budget(ctx: Context, entry: Entry) -> str | None:
    """--gpu_budget_s: why this entry would not end in time, or None. Its estimate (recorded for the report) is its
    table cost times budget_scale; it must end GPU_BUDGET_RESERVE_S before the budget, which counts from the
    process's start."""
    scale = budget_scale(ctx.budget_runs)
    estimate = entry_cost_s(ctx, entry) * scale
    ctx.budget_estimates[entry.name] = round(estimate, 1)
    spent = ctx.spent_s
    left = ctx.gpu_budget_s - GPU_BUDGET_RESERVE_S - spent
    if estimate <= left:
        return None
    slower = f" x {scale:.2f}, the overrun of the entries so far" if scale > 1 else ""
    return (f"time budget: ~{estimate:.0f}s expected (GPU_BUDGET_COST_S{slower}), {max(left, 0.0):.0f}s left of "
            f"--gpu_budget_s={ctx.gpu_budget_s:.0f} ({spent:.0f}s spent, {ctx.startup_s:.0f}s of them process startup; "
            f"{GPU_BUDGET_RESERVE_S}s kept for the report); raise --gpu_budget_s or run --only={entry.name}")


def describe_failure(e: BaseException) -> str:
    if isinstance(e, CheckFailed):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of GPU memory: {str(e).splitlines()[0]}"
    tail = "".join(traceback.format_exc().splitlines(keepends=True)[-12:])
    return f"{type(e).__name__}: {e}\n{tail}".rstrip()


def merge_ranks(ctx: Context, status: str, detail: str) -> tuple[str, str]:
    """All ranks ran the entry; it fails if it failed anywhere, and the detail names the ranks that failed."""
    if ctx.env.world_size == 1:
        return status, detail
    results = [None] * ctx.env.world_size
    dist.all_gather_object(results, (status, detail))
    by_detail = {}  # failure detail -> the ranks that reported it
    for r, (s, d) in enumerate(results):
        if s == "fail":
            by_detail.setdefault(d, []).append(str(r))
    if not by_detail:
        return results[0]
    return "fail", "\n".join(f"rank{'s' * (len(rs) > 1)} {','.join(rs)}: {d}" for d, rs in by_detail.items())


def result_line(result: dict) -> str:
    tag = {"pass": "PASS", "skip": "SKIP", "fail": "FAIL"}[result["status"]]
    line = f"[{tag}] {result['name']} ({result['seconds']:.1f}s): {result['detail']}"
    if result["status"] == "fail":
        line += f"\n       fix: {result['fix']}"
    return line


# -----------------------------------------------------------------------------------------------------------------
# Shared helpers: configurations, models placed as main() places them, comparisons, synthetic data


def config_args(flags: list[str], on_gpu: bool) -> tg.Hyperparameters:
    """Recipe defaults on GPU, the smoke preset on CPU, then the flags (explicit flags win, as in train_gpt)."""
    base = [] if on_gpu else ["--preset=smoke"]
    return tg.apply_overrides(tg.Hyperparameters(), base + list(flags))


def fp8_enabled(args: tg.Hyperparameters, device: torch.device) -> bool:
    """As main(): the FP8 head where asked for and the GPU supports it (compute capability >= 8.9)."""
    return args.fp8_head and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def place_model(args: tg.Hyperparameters, device: torch.device) -> tg.GPT:
    """build_model with main()'s seed, placed as main() places it (train_gpt.place_model: bf16 embeddings on GPU,
    --param_dtype, the FP8 head and FP8 MLPs where supported)."""
    torch.manual_seed(args.seed)
    return tg.place_model(tg.build_model(args), args, device)


def synchronize(device: torch.device):
    tg.synchronize(device)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max |error| / max |reference|) of out against ref, in fp32."""
    out, ref = out.detach().float(), ref.detach().float()
    diff = out - ref
    return ((diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            (diff.abs().max() / ref.abs().max().clamp_min(1e-30)).item())


class Comparison:
    """Collects named comparisons against references; verdict() raises CheckFailed listing every one out of
    tolerance (or non-finite), else returns a compact summary."""

    def __init__(self, dtype: torch.dtype):
        self.tolerance = TOLERANCE[dtype]
        self.notes, self.problems = [], []

    def add(self, name: str, out: torch.Tensor, ref: torch.Tensor, kind: str = "fwd",
            tolerance: tuple[float, float] | None = None):
        fro_tol, max_tol = tolerance or self.tolerance[kind]
        if not torch.isfinite(out).all():
            self.problems.append(f"{name}: non-finite values ({(~torch.isfinite(out)).sum().item()} elements)")
            return
        fro, mx = errors(out, ref)
        self.notes.append(f"{name} {fro:.1e}")
        if fro > fro_tol or mx > max_tol:
            self.problems.append(f"{name}: relative error {fro:.2e} (max {mx:.2e}) exceeds {fro_tol:.0e} "
                                 f"(max {max_tol:.0e})")

    def fail(self, problem: str):
        self.problems.append(problem)

    def verdict(self, prefix: str = "") -> str:
        if self.problems:
            raise CheckFailed(prefix + "; ".join(self.problems))
        return prefix + "max rel. errors " + ", ".join(self.notes)


def packed_documents(T: int, seed: int = 0, vocab_size: int = tg.GPT2_VOCAB) -> torch.Tensor:
    """T token ids (CPU, int64) packed like training data: the sequence starts inside a document, then documents
    of varied lengths follow, each starting at an EOT: a one-token document, boundaries mid-block and exactly on
    block edges (128), documents longer than any window, then ~1500-token documents (exponential lengths)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(vocab_size, tg.EOT_TOKEN), (T,), generator=g)
    if tg.EOT_TOKEN >= vocab_size:  # a custom vocabulary without GPT-2's EOT: one document
        return tokens
    lengths = [1, 70, 58, 128, 500, 127, 1, 129, 2500]
    pos, i = 37, 0
    while pos < T:
        tokens[pos] = tg.EOT_TOKEN
        pos += lengths[i] if i < len(lengths) else 1 + int(torch.empty(1).exponential_(1 / 1500, generator=g))
        i += 1
    return tokens


def learnable_stream(n_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A token stream a model learns in a few steps: one random 251-token phrase repeated, cut into documents of
    varied lengths by EOTs (int64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, min(vocab_size, tg.EOT_TOKEN), (251,), generator=g)
    stream = phrase.repeat(n_tokens // 251 + 1)[:n_tokens].clone()
    if tg.EOT_TOKEN < vocab_size:
        pos, lengths = 0, [300, 1000, 77, 2500, 640]
        for i in range(n_tokens):
            if pos >= n_tokens:
                break
            stream[pos] = tg.EOT_TOKEN
            pos += lengths[i % len(lengths)]
    return stream


def micro_batches(stream: torch.Tensor, start: int, count: int, seq_len: int, device: torch.device) -> list:
    """`count` (inputs int32, targets int64) consecutive sequences of seq_len from the stream, from `start` on."""
    out = []
    for m in range(count):
        buf = stream[start + m * seq_len:start + (m + 1) * seq_len + 1].to(device)
        out.append((buf[:-1].to(torch.int32), buf[1:].to(torch.int64)))
    return out


class StepSetup:
    """What main()'s loop sets before each step, from train_gpt itself: the step's window tensors (WindowTensors),
    the features' schedules (--yarn's rotary buffers, --mtp_weights' loss weights),
    plus the step's sequence length (--stages: the stage's)."""

    def __init__(self, model: nn.Module, args: tg.Hyperparameters, device: torch.device):
        self.args = args
        self.windows = tg.WindowTensors(args, device)
        self.schedules = tg.feature_schedules(model, args, device)

    def __call__(self, step: int):
        """Set step's state; returns (window, seq_len)."""
        for schedule in self.schedules:
            schedule.set(step)
        return self.windows[step], tg.sequence_length(step, self.args)


def window_tensor(blocks: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.int32, device=device)  # as main() passes it: a tensor, no recompiles


def gqa_heads(num_heads: int) -> int:
    """The K/V head count of the GQA cases: the divisor of num_heads nearest num_heads / 3 (6 heads -> 2)."""
    divisors = [d for d in range(1, num_heads) if num_heads % d == 0] or [num_heads]
    return min(divisors, key=lambda d: (abs(d - num_heads / 3), d))


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (a recompile hands it another one) and
    delegates to a real backend (inductor, or aot_eager on CPU)."""

    def __init__(self, name: str):
        self.name, self.inner, self.graphs = name, lookup_backend(name), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def graph_breaks() -> tuple[int, list[str]]:
    reasons = dynamo_counters["graph_break"]
    return sum(reasons.values()), [str(r).splitlines()[0][:160] for r in list(reasons)[:3]]


# -----------------------------------------------------------------------------------------------------------------
# Check: environment and collectives


def nvidia_smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def triton_pin() -> str | None:
    """The triton version this torch wheel pins (e.g. '3.4.0'), or None (CPU wheels, source builds)."""
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.match(r"(?:pytorch-)?triton\s*==\s*([^;\s]+)", req)
        if m:
            return m.group(1)
    return None


def environment_info(ctx: Context) -> dict:
    smi = nvidia_smi("driver_version,name")
    info = dict(python=platform.python_version(), torch=torch.__version__,
                triton=kernels.triton.__version__ if kernels.HAS_TRITON else None, triton_pinned_by_torch=triton_pin(),
                cuda=torch.version.cuda, driver=smi[0].split(",")[0].strip() if smi else None,
                nvidia_smi_gpus=len(smi), host=platform.node(), cpu=tg.cpu_name(), cpu_cores=os.cpu_count(),
                world_size=ctx.env.world_size, device=tg.device_name(ctx.device), git_commit=tg.git_commit())
    if ctx.on_gpu:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(total / 2 ** 30, 1), gpu_memory_free_gib=round(free / 2 ** 30, 1),
                    sms=props.multi_processor_count, visible_gpus=torch.cuda.device_count(),
                    fp8=(props.major, props.minor) >= (8, 9), peak_bf16_tflops=peak_tflops(props.name))
        api = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()  # e.g. 12080: the newest CUDA it runs
        info["driver_cuda"] = f"{api // 1000}.{api % 1000 // 10}" if api else None
    return info


def peak_tflops(gpu_name: str) -> float | None:
    return next((tflops for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, gpu_name)), None)


def collectives_roundtrip(ctx: Context) -> str:
    """All-reduce (fp32, bf16) and all-gather (Muon's all_gather_into_tensor) of values every rank can predict."""
    ws, rank, device = ctx.env.world_size, ctx.env.rank, ctx.device
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.full((1 << 16,), rank + 1.0, dtype=dtype, device=device)
        dist.all_reduce(t)
        expected = ws * (ws + 1) / 2  # small integers: exact in bf16
        if not torch.all(t == expected):
            raise CheckFailed(f"all_reduce({dtype}) gave {t.float().unique()[:4].tolist()}, expected {expected}")
    big = torch.full((1 << 22,), float(rank), device=device)  # 16 MiB: the chunked/ring paths
    dist.all_reduce(big)
    if not torch.all(big == ws * (ws - 1) / 2):
        raise CheckFailed("all_reduce of 16 MiB returned wrong values")
    mine = torch.full((4, 3), rank, dtype=torch.bfloat16, device=device)
    gathered = torch.empty((4 * ws, 3), dtype=torch.bfloat16, device=device)
    dist.all_gather_into_tensor(gathered, mine)
    expected = torch.arange(ws, device=device).repeat_interleave(4)[:, None].expand(-1, 3).bfloat16()
    if not torch.equal(gathered, expected):
        raise CheckFailed("all_gather_into_tensor returned wrong values")
    synchronize(device)
    return f"{dist.get_backend()} all_reduce/all_gather round trips ok on {ws} ranks"


@check("env", fix="install a torch build whose CUDA version this driver supports and the triton it pins "
                  "(pip install torch triton; see https://pytorch.org/get-started/locally/), stop other processes "
                  "on the GPUs (nvidia-smi), and for collectives check NCCL_* variables, `nvidia-smi topo -m` and "
                  "(NVSwitch nodes) `systemctl status nvidia-fabricmanager`")
def check_env(ctx: Context) -> str:
    problems, notes = [], []
    if ctx.env.world_size > 1:  # first: every rank must reach these collectives, whatever fails below
        try:
            notes.append(collectives_roundtrip(ctx))
        except CheckFailed as e:
            problems.append(f"collectives: {e}")
    else:
        notes.append("world size 1: no collectives to check (run under torchrun for NCCL)")
    info = environment_info(ctx)
    ctx.info.update(info)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")  # GPUs hidden on purpose
    if info["nvidia_smi_gpus"] and not ctx.on_gpu and not hidden:
        problems.append(f"nvidia-smi lists {info['nvidia_smi_gpus']} GPU(s) (driver {info['driver']}) but torch "
                        f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'}) cannot use "
                        f"them: install a CUDA build of torch this driver supports, or update the driver")
    if not hasattr(BlockMask, "from_kv_blocks") or not hasattr(torch, "_scaled_mm"):
        problems.append(f"torch {torch.__version__} lacks BlockMask.from_kv_blocks / torch._scaled_mm: "
                        f"pip install 'torch>=2.6'")
    if not hasattr(torch, "_grouped_mm"):
        notes.append("no torch._grouped_mm: --moe_experts needs torch >= 2.8")
    if ctx.on_gpu:
        if not kernels.HAS_TRITON:
            problems.append("triton is not importable (torch.compile and the kernels need it): pip install triton"
                            + (f"=={info['triton_pinned_by_torch']}" if info["triton_pinned_by_torch"] else ""))
        elif info["triton_pinned_by_torch"] and (info["triton"].split("+")[0]
                                                 != info["triton_pinned_by_torch"].split("+")[0]):
            problems.append(f"triton {info['triton']} but torch {torch.__version__} pins "
                            f"{info['triton_pinned_by_torch']}: pip install triton=={info['triton_pinned_by_torch']}")
        cc = tuple(map(int, info["compute_capability"].split(".")))
        if cc < (8, 0):
            problems.append(f"compute capability {info['compute_capability']} has no bf16 tensor cores: the recipe "
                            f"needs an Ampere or newer GPU")
        held = info["gpu_memory_gib"] - info["gpu_memory_free_gib"]
        if held > OTHER_PROCESS_GIB:
            problems.append(f"{held:.1f} GiB of {info['gpu_memory_gib']} GiB on {ctx.device} is already in use "
                            f"(another process? nvidia-smi shows it): stop it before the run")
        if info["visible_gpus"] > ctx.env.world_size and ctx.env.master:
            notes.append(f"{info['visible_gpus']} GPUs visible, world size {ctx.env.world_size}")
    if problems:
        raise CheckFailed("; ".join(problems))
    gpu = (f"{info['gpu']} cc {info['compute_capability']}, {info['gpu_memory_free_gib']}/{info['gpu_memory_gib']} "
           f"GiB free, FP8 {'yes' if info['fp8'] else 'no'}, driver {info['driver']} (CUDA {info['driver_cuda']}), "
           if ctx.on_gpu
           else f"CPU {info['cpu']} ({info['cpu_cores']} cores), ")
    return (f"{gpu}torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, world size "
            f"{ctx.env.world_size}; " + "; ".join(notes))


# -----------------------------------------------------------------------------------------------------------------
# Check: FlexAttention with the script's block masks vs dense SDPA


@dataclass(frozen=True)
class AttnCase:
    name: str
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    window: int  # long-window blocks, as long_window_blocks returns them
    halvings: int = 0  # 1: the short window
    byte_stream: bool = False  # --mot=cross+self: tokens x bytes_per_token positions, CharSelfAttention's mask
    unit: str = "block"  # --window_unit of the token masks (the byte stream's window is always in blocks)


def attention_cases(args: tg.Hyperparameters, quick: bool) -> list[AttnCase]:
    H, hd = args.num_heads, args.model_dim // args.num_heads
    final, kv, rope = tg.long_window_blocks(args.num_iterations, args), gqa_heads(args.num_heads), args.mla_rope_dim
    mot = dataclasses.replace(args, mot="cross+self")
    char_window = mot_feature.CharSelfAttention(mot).window_blocks
    char_heads, char_hd = mot.mot_heads, mot.char_dim // mot.mot_heads
    unit, windows = args.window_unit, f" ({args.window_unit} window)" if args.window_unit != "block" else ""
    cases = [AttnCase(f"MHA {H}x{hd} long window{windows}", H, H, hd, hd, final, unit=unit)]
    if quick:  # each case is its own compile (most of the check's time): GQA and MLA ride on the short window
        cases.append(AttnCase(f"GQA {H}/{kv} heads + MLA dims qk {hd + rope} v {hd}, short window{windows}", H, kv,
                              hd + rope, hd, final, halvings=1, unit=unit))
    else:
        cases += [AttnCase(f"MHA {H}x{hd} short window{windows}", H, H, hd, hd, final, halvings=1, unit=unit),
                  AttnCase(f"MHA {H}x{hd} step-0 window (1 block, halved){windows}", H, H, hd, hd, 1, halvings=1,
                           unit=unit),
                  AttnCase(f"GQA {H} q / {kv} kv heads", H, kv, hd, hd, final, unit=unit),
                  AttnCase(f"MLA qk {hd + rope} v {hd}", H, H, hd + rope, hd, final, unit=unit)]
    cases.append(AttnCase(f"byte stream x{mot.bytes_per_token} ({char_heads}x{char_hd}, window {char_window} "
                          f"blocks)", char_heads, char_heads, char_hd, char_hd, char_window, byte_stream=True))
    return cases


def reference_attention(q, k, v, docs, window_blocks, halvings: int, scale: float, band: int | None = None,
                        chunk: int = 1024, unit: str = "block") -> torch.Tensor:
    """Dense SDPA in fp32 under the dense mask, one chunk of queries at a time: each chunk's mask rows are
    dense_attention_mask's rows (the script's mask_mod on index grids) over keys [lo, chunk end); later keys are
    acausal, and `band` bounds how far back keys are taken (byte streams, whose T x T mask would not fit; a band at
    least the window loses nothing). GQA by repeating K/V heads. Checkpointed per chunk: the backward holds one
    chunk's scores at a time."""
    q, k, v = q.float(), k.float(), v.float()
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    mask_mod = tg.doc_causal_window_mask(docs, window_blocks, halvings, unit)
    idx = torch.arange(q.size(2), device=q.device)
    outs = []
    for s in range(0, q.size(2), chunk):
        e = min(s + chunk, q.size(2))
        lo = 0 if band is None else max(0, s - band)
        rows = mask_mod(0, 0, idx[s:e, None], idx[None, lo:e])

        def attend(qc, kc, vc, rows=rows):
            return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=rows, scale=scale)
        parts = (q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e])
        outs.append(checkpoint(attend, *parts, use_reentrant=False) if q.requires_grad else attend(*parts))
    return torch.cat(outs, dim=2)


def run_attention_case(case: AttnCase, tokens: torch.Tensor, bytes_per_token: int, scale: float, dtype, flex_fn,
                       backward: bool, cmp: Comparison, seed: int = 0, build_mask=None):
    """FlexAttention (flex_fn) under the script's block mask vs reference_attention, forward (+ backward) on the
    device of `tokens`; the mask is built as the model builds it (GPT.attention_masks / CharSelfAttention)."""
    build_mask = build_mask or tg.flex_block_mask
    device = tokens.device
    if case.byte_stream:
        docs = tg.document_ids(tokens).repeat_interleave(bytes_per_token)
        window = case.window  # CharSelfAttention passes a Python int (and never halves it)
        block_mask = build_mask(docs, window, docs=docs, halvings=case.halvings)
        band, chunk = (window + 1) * tg.BLOCK_SIZE, 4096
    else:
        tokens = tokens.to(torch.int32)  # as the loader yields them
        docs = tg.document_ids(tokens)
        window = window_tensor(case.window, device)
        block_mask = build_mask(tokens, window, halvings=case.halvings, unit=case.unit)
        band, chunk = None, 1024
    T = len(docs)
    g = torch.Generator(device=device).manual_seed(seed)
    q = tg.norm(torch.randn(1, case.heads, T, case.qk_dim, device=device, generator=g)).to(dtype)  # RMS-normed
    k = tg.norm(torch.randn(1, case.kv_heads, T, case.qk_dim, device=device, generator=g)).to(dtype)
    v = torch.randn(1, case.kv_heads, T, case.v_dim, device=device, generator=g).to(dtype)
    leaves = [t.requires_grad_(backward) for t in (q, k, v)]
    ref_leaves = [t.detach().float().requires_grad_(backward) for t in leaves]
    out = flex_fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=case.kv_heads != case.heads)
    ref = reference_attention(*ref_leaves, docs, window, case.halvings, scale, band, chunk, case.unit)
    cmp.add(f"{case.name} out", out, ref)
    if backward:
        d_out = torch.randn(out.shape, device=device, generator=g).to(dtype)
        grads = torch.autograd.grad(out, leaves, d_out)
        ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.float())
        for name, got, want in zip("qkv", grads, ref_grads):
            cmp.add(f"d{name}", got, want, "bwd")


@check("flex_attention", fix="FlexAttention disagrees with the dense reference on this torch/triton/GPU: training "
                             "would attend wrongly. Reinstall torch with the triton it pins, or try another torch "
                             "release; report the failing case (the detail names it)")
def check_flex_attention(ctx: Context) -> str:
    args = ctx.args
    T = args.seq_len if ctx.on_gpu else 1024
    byte_tokens = (min(args.seq_len, 8192) if ctx.quick else args.seq_len) if ctx.on_gpu else 256
    backward = ctx.on_gpu  # FlexAttention has no CPU backward
    cmp, seconds = Comparison(ctx.dtype), {}
    for case in attention_cases(args, ctx.quick):
        t0 = time.perf_counter()
        torch._dynamo.reset()  # each case is its own compile; keeps the recompile limit out of the way
        flex_fn = torch.compile(flex_attention, dynamic=False)  # as training runs it (CPU: block lists honored)
        tokens = packed_documents(byte_tokens if case.byte_stream else T, seed=len(seconds)).to(ctx.device)
        run_attention_case(case, tokens, args.bytes_per_token, args.attn_scale, ctx.dtype, flex_fn, backward, cmp,
                           seed=len(seconds))
        seconds[case.name] = round(time.perf_counter() - t0, 1)
        ctx.progress("flex_attention", f"{case.name}: {seconds[case.name]}s (compile included)")
    ctx.timings["flex_attention_case_s"] = seconds
    passes = "forward + backward" if backward else "forward (no CPU backward)"
    return cmp.verdict(f"T={T} tokens / {byte_tokens}x{args.bytes_per_token} bytes, {ctx.dtype}, {passes}: ")


# -----------------------------------------------------------------------------------------------------------------
# Check: the FP8 head matmul


def head_loss(z: torch.Tensor, targets: torch.Tensor, step_tokens: int) -> torch.Tensor:
    """The training loss on head outputs z (GPT.logits: 30 * sigmoid(z / 7.5), then cross-entropy), scaled so each
    token's gradient is as large as in a step of step_tokens tokens (a mean over micro_batches x seq_len)."""
    return F.cross_entropy(30 * torch.sigmoid(z.float() / 7.5), targets) * len(targets) / step_tokens


@check("fp8_head", fix="the FP8 lm_head is inaccurate or overflows here: run with --fp8_head=false (bf16 head), "
                       "and check that torch._scaled_mm works on this GPU/torch")
def check_fp8_head(ctx: Context) -> str:
    args = ctx.args
    if ctx.on_gpu:
        cc = torch.cuda.get_device_capability(ctx.device)
        if cc < (8, 9):
            raise Skip(f"no FP8 on compute capability {cc[0]}.{cc[1]} (the run uses --fp8_head=false automatically)")
        if not args.fp8_head:
            raise Skip("--fp8_head=false: this run does not use the FP8 head")
    real = args if ctx.on_gpu else tg.Hyperparameters()  # CPU: the recipe's width and gradient size, fewer tokens
    N, D, V = (16384 if ctx.on_gpu else 128), real.model_dim, tg.next_multiple(real.vocab_size, 128)
    rows = ""
    if ctx.quick and not ctx.on_gpu:  # where oneDNN has no FP8 kernel (Intel Xeon: ~25 MFLOP/s) the full head takes
        N, V = 16, 1024  # minutes; a slice of its rows runs the same ops, scales and saturation bookkeeping
        rows = f" ({V} of the head's {tg.next_multiple(real.vocab_size, 128)} rows: CPU --quick)"
    step_tokens = real.micro_batches * real.seq_len
    scales = tg.FP8_HEAD_SCALES
    g = torch.Generator(device=ctx.device).manual_seed(0)
    head = tg.CastedLinear(D, V).to(ctx.device)  # fp32 master weight with the head's init scale
    head.use_fp8 = True
    x = tg.norm(torch.randn(N, D, device=ctx.device, generator=g)).bfloat16().requires_grad_()  # normed hidden
    targets = torch.randint(0, min(real.vocab_size, V), (N,), device=ctx.device, generator=g)
    seen = {}
    z = head(x)  # CastedLinear's training path: fp8_mm
    z.register_hook(lambda grad: seen.setdefault("grad", grad.detach()))
    dx, dw = torch.autograd.grad(head_loss(z, targets, step_tokens), (x, head.weight))
    z = z.detach()
    x_ref, w_ref = x.detach().float().requires_grad_(), head.weight.detach().clone().requires_grad_()
    z_ref = x_ref @ w_ref.t()
    dx_ref, dw_ref = torch.autograd.grad(head_loss(z_ref, targets, step_tokens), (x_ref, w_ref))
    cmp = Comparison(ctx.dtype)
    tol = (FP8_TOLERANCE, 2.0)  # bounded in norm; single elements of an fp8 product may be far off
    cmp.add("out", z, z_ref, tolerance=tol)
    cmp.add("dx", dx, dx_ref, tolerance=tol)
    cmp.add("dw", dw, dw_ref, tolerance=tol)
    bf16_err = errors(F.linear(x.detach(), head.weight.detach().bfloat16()), z_ref)[0]
    grad = seen["grad"].float()
    headroom = {"x": x.detach().float().abs().max().item() * scales["x_scale"] / E4M3_MAX,
                "w": head.weight.detach().abs().max().item() * scales["w_scale"] / E4M3_MAX,
                "grad": grad.abs().max().item() * scales["grad_scale"] / E5M2_MAX}
    for name, used in headroom.items():
        if not used < 1:
            cmp.fail(f"{name} saturates its FP8 format: max |{name}| x scale is {used:.2f}x the format's max")
    nonzero = grad != 0
    underflow = ((grad.abs() * scales["grad_scale"] < E5M2_TINY) & nonzero).sum().item() / max(nonzero.sum().item(), 1)
    ctx.timings["fp8_head"] = dict(tokens=N, scale_use=headroom, grad_underflow_frac=underflow, bf16_head_err=bf16_err)
    use = ", ".join(f"{k} {v:.2g}" for k, v in headroom.items())
    return cmp.verdict(f"x ({N}, {D}) @ w ({V}, {D}){rows}: ") + (
        f"; bf16 head {bf16_err:.1e}; max / format max: {use}; grads flushed to zero {underflow:.1%}")


@check("fp8_mlp", fix="the FP8 MLP (--fp8_mlp, on in --preset=frontier) is inaccurate or saturates here: run with "
                      "--fp8_mlp=false (bf16 MLP), and check that torch._scaled_mm works on this GPU/torch")
def check_fp8_mlp(ctx: Context) -> str:
    """features/fp8_mlp.py's FP8MLP's training path (both matmuls e4m3) vs the fp32 relu^2 MLP on the same weights,
    output and the straight-through gradients, in two passes: the first at current scales, the second at the delayed
    ones a training step leaves (p at the first pass's amax x FP8_MLP_P_MARGIN, W2 at its refreshed amax x
    margin)."""
    if ctx.on_gpu:
        cc = torch.cuda.get_device_capability(ctx.device)
        if cc < (8, 9):
            raise Skip(f"no FP8 on compute capability {cc[0]}.{cc[1]} (--fp8_mlp runs the bf16 MLP there)")
    # GPU: the run's width; CPU: the recipe's, the smoke width under --quick (reference-only FP8 matmuls are slow)
    dims = ctx.args if ctx.on_gpu or ctx.quick else tg.Hyperparameters()
    args = dataclasses.replace(dims, fp8_mlp=True, mlp_act="relu2", kron_mlp="off", ks_mlp="off", moe_experts=0)
    tokens = (4096 if ctx.quick else 16384) if ctx.on_gpu else (64 if ctx.quick else 16)
    torch.manual_seed(0)
    mlp = fp8_mlp_feature.FP8MLP(args).to(ctx.device).train()
    with torch.no_grad():  # live weights: the zero-initialized c_proj would carry no signal
        mlp.c_proj.weight.normal_(0, 0.02)
    mlp.use_fp8 = True
    dense = tg.MLP(dataclasses.replace(args, fp8_mlp=False)).to(ctx.device)
    dense.load_state_dict(mlp.state_dict())  # the same weights; the FP8 scaling state is dropped
    g = torch.Generator(device=ctx.device).manual_seed(3)
    cmp, amax, tol = Comparison(ctx.dtype), [], (FP8_TOLERANCE, 2.0)
    for n, label in enumerate(("current scales", "delayed scales")):
        x = tg.norm(torch.randn(tokens, args.model_dim, device=ctx.device, generator=g)).to(ctx.dtype)
        x.requires_grad_()
        dy = torch.randn(tokens, args.model_dim, device=ctx.device, generator=g).to(ctx.dtype)
        out = mlp(x)  # one training forward per pass: each updates the scaling state
        grads = torch.autograd.grad(out, [x, mlp.c_fc.weight, mlp.c_proj.weight], dy)
        amax.append(mlp.p_amax.item())
        x_ref = x.detach().float().requires_grad_()
        ref = dense(x_ref)
        ref_grads = torch.autograd.grad(ref, [x_ref, dense.c_fc.weight, dense.c_proj.weight], dy.float())
        cmp.add(f"{label} out", out, ref, tolerance=tol)
        for name, got, want in zip(("dx", "d fc", "d proj"), grads, ref_grads):
            cmp.add(name, got, want, tolerance=tol)
        if n == 0:  # as a training step does before its optimizer step (Muon's pre-hook), then past the steps
            mlp.refresh()  # that scale W2 exactly: the second pass takes both delayed scales
            mlp.refreshes.fill_(fp8_mlp_feature.FP8_MLP_W2_EXACT_STEPS)
    p_use = amax[1] / (amax[0] * fp8_mlp_feature.FP8_MLP_P_MARGIN)  # > 1: p saturated e4m3 at the delayed scale
    if not p_use < 1:
        cmp.fail(f"p = relu(h W1^T)^2 saturates e4m3 at its delayed scale: amax {amax[1]:.3g} is {p_use:.2f}x the "
                 f"previous amax x {fp8_mlp_feature.FP8_MLP_P_MARGIN}")
    used = "" if ctx.args.fp8_mlp else " (--fp8_mlp is off in these flags; --preset=frontier turns it on)"
    return cmp.verdict(f"{tokens} tokens, {args.model_dim} <-> {args.mlp_ratio * args.model_dim}, {ctx.dtype}"
                       f"{used}: ") + f"; p's delayed scale used at {p_use:.0%}"


# -----------------------------------------------------------------------------------------------------------------
# Check: Kronecker and Kronecker-sparse kernels, MoE


def compare_impls(cmp: Comparison, label: str, layer: nn.Module, impl: str, ref_impl: str, tokens: int, dtype,
                  device: torch.device):
    """layer with `impl` in dtype vs layer with `ref_impl` in fp32 on the same parameters: output and all grads."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, layer.in_features, device=device, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(tokens, layer.out_features, device=device, generator=g).to(dtype)
    params = list(layer.parameters())
    layer.impl = impl
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    x_ref = x.detach().float().requires_grad_()
    layer.impl = ref_impl
    y_ref = layer(x_ref)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *params], dy.float())
    cmp.add(f"{label} out", y, y_ref)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        cmp.add(f"d{'x' if i == 0 else f'w{i - 1}'}", got, want, "bwd")


@check("kron_ks_kernels", fix="the Triton Kronecker/KS kernels are wrong here: do not use --kron_impl=triton / "
                              "--ks_impl=triton (--kron_impl=torch, --ks_impl=bmm), and check the triton version "
                              "(env)")
def check_kron_ks_kernels(ctx: Context) -> str:
    if not kernels.HAS_TRITON:
        if ctx.on_gpu:
            raise CheckFailed("triton is not importable")
        raise Skip("triton is not installed")
    if not ctx.on_gpu and not kernels.TRITON_INTERPRET:
        raise Skip("CPU without TRITON_INTERPRET=1 (set it before starting to run the kernels in the interpreter)")
    args = ctx.args  # CPU, not --quick: the real shapes, slow in the interpreter
    if not ctx.on_gpu and not ctx.quick:
        args = dataclasses.replace(args, model_dim=tg.Hyperparameters.model_dim, mlp_ratio=tg.Hyperparameters.mlp_ratio)
    tokens = (4096 if ctx.quick else 16384) if ctx.on_gpu else 16
    dim, hidden = args.model_dim, args.mlp_ratio * args.model_dim
    cmp, done = Comparison(ctx.dtype), []
    for kind, impl, ref_impl in (("kron", "triton", "dense"), ("ks", "triton", "bmm")):
        layer_args = dataclasses.replace(args, kron_mlp="both" if kind == "kron" else "off",
                                         ks_mlp="both" if kind == "ks" else "off", moe_experts=0, mlp_act="relu2",
                                         mla_kv_rank=0, mla_q_rank=0, n_kv_heads=0)
        try:
            tg.check_config(layer_args, 1)
        except SystemExit as e:
            done.append(f"{kind}: not applicable to this config ({e})")
            continue
        for which, in_f, out_f in (("fc", dim, hidden), ("proj", hidden, dim)):
            torch.manual_seed(0)
            layer = tg.mlp_linear(layer_args, which, in_f, out_f, zero_init=False).to(ctx.device)  # fp32 masters
            compare_impls(cmp, f"{kind} {which}", layer, impl, ref_impl, tokens, ctx.dtype, ctx.device)
        done.append(f"{kind} {impl} vs {ref_impl}")
    return cmp.verdict(f"{', '.join(done)} at {dim}<->{hidden}, {tokens} tokens, {ctx.dtype}: ")


def moe_reference(moe: moe_feature.MoE, x: torch.Tensor, act: str):
    """Per-expert loop in fp32 on the module's parameters: each token's top-k experts by router probs + bias (the
    selection computed as the module computes it, so near-ties pick the same experts) and every shared expert,
    each expert's MLP on its tokens, outputs summed with the gates (fp32 router probs; shared experts weight 1).
    Returns (output, the selection, the fp32 probs)."""
    with torch.no_grad():
        select_probs = F.linear(x, moe.router.weight.type_as(x)).float().softmax(-1)
        top = torch.topk(select_probs + moe.bias, moe.topk, dim=-1).indices
    x_ref = x.float()
    probs = F.linear(x_ref, moe.router.weight.float()).softmax(-1)
    activation = {"relu2": lambda h: F.relu(h).square(), "gelu": F.gelu}[act]
    out = torch.zeros_like(x_ref)
    for e in range(moe.num_experts + moe.num_shared):
        if e < moe.num_experts:
            tok, _ = (top == e).nonzero(as_tuple=True)
            gate = probs[tok, e]
        else:
            tok = torch.arange(len(x), device=x.device)
            gate = torch.ones(len(x), device=x.device)
        h = activation(x_ref[tok] @ moe.fc_w[e].float().t())
        out = out.index_add(0, tok, (h @ moe.proj_w[e].float().t()) * gate[:, None])
    return out, top, probs


@check("moe", fix="the grouped-matmul MoE disagrees with a per-expert loop here: do not use --moe_experts on this "
                  "torch/GPU (torch._grouped_mm; try another torch release)")
def check_moe(ctx: Context) -> str:
    if not hasattr(torch, "_grouped_mm"):
        raise Skip(f"torch {torch.__version__} has no torch._grouped_mm (--moe_experts needs torch >= 2.8)")
    flags = [] if ctx.args.moe_experts else ["--moe_experts=8", "--moe_shared=1"]
    args = config_args(ctx.flags + flags, ctx.on_gpu)
    if args.mlp_act not in ("relu2", "gelu") or args.kron_mlp != "off" or args.ks_mlp != "off" or args.fp8_mlp:
        args = dataclasses.replace(args, mlp_act="relu2", kron_mlp="off", ks_mlp="off", fp8_mlp=False)
    tg.check_config(args, 1)
    tokens = (4096 if ctx.quick else 8192) if ctx.on_gpu else 256
    torch.manual_seed(0)
    moe = moe_feature.MoE(args).to(ctx.device)
    with torch.no_grad():  # live weights: zero-initialized projections carry no signal, a random router spreads load
        moe.proj_w.normal_(0, moe.hidden ** -0.5)
        moe.router.weight.normal_(0, args.model_dim ** -0.5)
    g = torch.Generator(device=ctx.device).manual_seed(2)
    x = torch.randn(tokens, args.model_dim, device=ctx.device, generator=g).to(ctx.dtype).requires_grad_()
    params = [x, moe.fc_w, moe.proj_w, moe.router.weight]
    y = moe(x)
    experts, _, _ = moe.route(x.detach())
    dy = torch.randn(y.shape, device=ctx.device, generator=g).to(ctx.dtype)
    grads = torch.autograd.grad(y, params, dy)
    y_ref, top, probs = moe_reference(moe, x, args.mlp_act)
    ref_grads = torch.autograd.grad(y_ref, params, dy.float())
    cmp = Comparison(ctx.dtype)
    if not torch.equal(experts[:, :moe.topk].sort(-1).values, top.sort(-1).values):
        cmp.fail("route() picked different experts than the reference selection")
    cmp.add("out", y, y_ref)
    for name, got, want in zip(("dx", "d fc_w", "d proj_w", "d router"), grads, ref_grads):
        cmp.add(name, got, want, "bwd")
    load = torch.bincount(top.flatten(), minlength=moe.num_experts).float()
    aux_ref = moe.aux_coef * moe.num_experts * (load / (tokens * moe.topk) * probs.detach().mean(0)).sum()
    if moe.aux_coef:
        cmp.add("aux loss", moe.aux_loss.detach().reshape(1), aux_ref.reshape(1), tolerance=(1e-2, 1e-2))
    spread = f"{int(load.min())}-{int(load.max())} tokens per routed expert"
    return cmp.verdict(f"{moe.num_experts} experts top-{moe.topk} + {moe.num_shared} shared, width {moe.hidden}, "
                       f"{tokens} tokens ({spread}), {ctx.dtype}: ")


# -----------------------------------------------------------------------------------------------------------------
# Check: the model's FlexAttention path, compiled training steps


@check("model_flex_forward", quick=False,
       fix="the model's FlexAttention path (flex_block_mask inside a compiled graph) disagrees with its dense-mask "
           "path: report it with the detail; GPU training uses this path")
def check_model_flex_forward(ctx: Context) -> str:
    if ctx.on_gpu:
        raise Skip("GPU training always attends through FlexAttention: compiled_training covers it")
    args = ctx.args
    model = place_model(args, ctx.device).eval()
    with torch.no_grad():  # live weights: the zero-initialized projections would hide the attention
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    inputs = packed_documents(args.seq_len, vocab_size=args.vocab_size).to(ctx.device, torch.int32)
    windows = [tg.long_window_blocks(args.num_iterations, args), 1]
    backend = CountingBackend("inductor")  # CPU FlexAttention exists only compiled, forward only
    compiled = torch.compile(model, backend=backend, dynamic=False)
    cmp = Comparison(ctx.dtype)
    with torch.no_grad():
        for w in windows:
            ref = model(inputs, None, window_tensor(w, ctx.device))
            tg.FLEX_ATTENTION_ON_CPU = True
            try:
                out = compiled(inputs, None, window_tensor(w, ctx.device))
            finally:
                tg.FLEX_ATTENTION_ON_CPU = False
            cmp.add(f"logits window {w}", out, ref)
    if backend.graphs != 1:
        cmp.fail(f"{backend.graphs} graphs for {len(windows)} windows (a window change recompiled)")
    return cmp.verdict(f"{args.seq_len} tokens, windows {windows}, 1 graph: ")


@contextlib.contextmanager
def eager_flex_compiled(on_gpu: bool):
    """Eager FlexAttention on GPU materializes every T x T score matrix (tens of GiB at seq_len 49152), so the
    'uncompiled' reference model on GPU runs eagerly with only the attention kernel compiled."""
    if not on_gpu:
        yield
        return
    original = tg.flex_attention
    tg.flex_attention = torch.compile(flex_attention, dynamic=False)
    try:
        yield
    finally:
        tg.flex_attention = original


def run_steps(model, optimizers: list, args: tg.Hyperparameters, stream: torch.Tensor, schedule: list[int], device,
              micro: int, after_step: Callable[[int, float], None]) -> list[float]:
    """train_step at the given schedule steps (windows, LR and momentum as at those steps of the run), `micro`
    sequences of the stream each; returns the losses."""
    losses, start, setup = [], 0, StepSetup(getattr(model, "_orig_mod", model), args, device)
    for i, step in enumerate(schedule):
        window, seq_len = setup(step)
        batch = micro_batches(stream, start, micro, seq_len, device)
        start += micro * seq_len
        losses.append(tg.train_step(model, optimizers, batch, window, args, step, 1).item())
        after_step(i, losses[-1])
    return losses


@check("compiled_training", fix="torch.compile of the training step misbehaves here (the detail says how): try "
                                "--compile=false to confirm, then another torch/triton release; recompiles or graph "
                                "breaks cost time every step")
def check_compiled_training(ctx: Context) -> str:
    base = ctx.args
    # CPU --quick: first, middle and last step of the schedule, so the window still grows (and three stages still
    # come in turn) at three quarters of the steps
    n_steps = (4 if ctx.quick else 8) if ctx.on_gpu else (3 if ctx.quick else 6)
    micro = min(base.micro_batches // ctx.env.world_size, 2 if ctx.on_gpu else 1)  # the run's per-sequence graph
    args = dataclasses.replace(base, micro_batches=micro)
    # windows grow (and with --stages, sequences too: one graph per distinct length, as in main())
    schedule = [round(i * (tg.total_steps(base) - 1) / (n_steps - 1)) for i in range(n_steps)]
    windows = [tg.window_at(s, base) for s in schedule]
    lengths = [tg.sequence_length(s, base) for s in schedule]
    stream = learnable_stream(micro * sum(lengths) + 1, args.vocab_size)
    model = place_model(args, ctx.device)
    initial = copy.deepcopy(model.state_dict())

    def log(kind: str, i: int, loss: float):
        ctx.progress("compiled_training", f"{kind} step {i + 1}/{n_steps} (schedule step {schedule[i]}, window "
                                          f"{windows[i]}): loss {loss:.4f}")

    eager, eager_note = None, ""
    try:
        with eager_flex_compiled(ctx.on_gpu):
            eager = run_steps(model, tg.build_optimizers(model, args), args, stream, schedule, ctx.device, micro,
                              lambda i, loss: log("eager", i, loss))
    except torch.OutOfMemoryError:
        eager_note = "; eager reference out of memory: compiled-vs-eager comparison skipped"
    model.load_state_dict(initial)  # the same initial state (MoE buffers included) for the compiled run
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch._dynamo.reset()
    dynamo_counters.clear()
    backend = CountingBackend("inductor" if ctx.on_gpu else "aot_eager")  # CPU inductor would not fit the budget
    compiled = torch.compile(model, backend=backend, dynamic=False)
    optimizers = tg.build_optimizers(model, args)
    orthogonalize = None
    if ctx.on_gpu:  # as main(): Newton-Schulz compiled on GPU
        orthogonalize = optimizers[1].orthogonalize = torch.compile(tg.zeropower_via_newtonschulz5, backend=backend)
    graphs_after, t0, compile_s = [], time.perf_counter(), 0.0

    def after(i: int, loss: float):
        nonlocal compile_s
        graphs_after.append(backend.graphs)
        if i == 0:
            compile_s = time.perf_counter() - t0
        log("compiled", i, loss)
    losses = run_steps(compiled, optimizers, args, stream, schedule, ctx.device, micro, after)
    if ctx.on_gpu and base.compile:  # step_time times this compiled model instead of compiling it again
        ctx.stash.update(model=model, compiled=compiled, orthogonalize=orthogonalize)
        ctx.estimate_s = max(ctx.estimate_s, 1.5 * compile_s)  # what a measurement that compiles will take
    breaks, reasons = graph_breaks()
    new_lengths = len(set(lengths)) - 1  # each later stage's sequence length is one new graph (main() too)
    recompiles = graphs_after[-1] - graphs_after[0] - new_lengths
    problems = []
    if not all(math.isfinite(v) for v in losses):
        problems.append(f"non-finite loss: {losses}")
    elif not losses[-1] < losses[0] - 0.5:
        problems.append(f"loss does not fall on a repeated stream: {[round(v, 3) for v in losses]}")
    if recompiles:
        problems.append(f"{recompiles} recompiles after the first step beyond the {new_lengths} new sequence "
                        f"lengths (windows {windows}, lengths {lengths}): window changes recompile")
    if breaks:
        problems.append(f"{breaks} graph breaks: {reasons}")
    diff = None
    if eager is not None:
        diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, eager))
        tol = 2e-2 if ctx.on_gpu else 1e-4  # bf16 kernels reorder sums; aot_eager runs the eager ops
        if not diff <= tol:
            problems.append(f"compiled losses {[round(v, 4) for v in losses]} differ from eager "
                            f"{[round(v, 4) for v in eager]} by up to {diff:.1e} (relative; allowed {tol:.0e})")
    ctx.timings["compiled_training"] = dict(losses=losses, eager_losses=eager, windows=windows, graphs=backend.graphs,
                                            recompiles=recompiles, graph_breaks=breaks, first_step_s=round(compile_s, 1))
    if problems:
        raise CheckFailed("; ".join(problems))
    compared = f"max rel. diff {diff:.1e}" if diff is not None else "n/a"
    sizes = f"{micro} x {'/'.join(map(str, sorted(set(lengths))))}"
    return (f"{n_steps} steps x {sizes} tokens ({backend.name}, windows {windows}): loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}, {backend.graphs} graphs, 0 recompiles beyond {new_lengths} new "
            f"sequence lengths, 0 graph breaks, compiled vs eager {compared}{eager_note}")


# -----------------------------------------------------------------------------------------------------------------
# Measurements


def forward_flops_per_token(model: tg.GPT, args: tg.Hyperparameters) -> float:
    """describe_model's estimate (its "forward FLOPs/token" line ends '= <M>M'; --stages adds the stage table
    after it), so MFU uses the same count the run prints."""
    line = next(t for t in tg.describe_model(model, args).splitlines() if t.startswith("forward FLOPs/token"))
    return float(re.search(r"= ([\d.]+)M$", line).group(1)) * 1e6


def document_micro_batches(args: tg.Hyperparameters, count: int, device: torch.device, seed: int,
                           seq_len: int | None = None) -> list:
    """`count` (inputs int32, targets int64) sequences of packed documents (seq_len tokens, default the flag's):
    block sparsity like real data."""
    out = []
    for i in range(count):
        buf = packed_documents((seq_len or args.seq_len) + 1, seed=1000 * seed + i,
                               vocab_size=args.vocab_size).to(device)
        out.append((buf[:-1].to(torch.int32), buf[1:].to(torch.int64)))
    return out


def timed_steps(args: tg.Hyperparameters) -> list[tuple[str, int, int]]:
    """(label, step, steps it stands for) of each point time_config times: #21's last step; with --stages the first
    step of every stage and of the extension (each its own sequence length and windows)."""
    stages = tg.training_stages(args)
    if not stages:
        return [("", args.num_iterations - 1, args.num_iterations)]
    return [("extension" if st.start >= args.num_iterations else f"stage {k + 1}", st.start, st.end - st.start)
            for k, st in enumerate(stages)]


def time_config(ctx: Context, name: str, extra_flags: list[str], first_stage_only: bool = False) -> dict:
    """ms/step of train_step at this config as main() runs it (compiled on GPU, eager on CPU; micro_batches /
    world_size sequences per rank; the final, widest window; with --stages each stage at its own length and
    windows, then the step-weighted mean), median of repeats after warm-up, and the training time it implies
    (est_train_s: ms/step x steps, validation and compile excluded). first_stage_only: with --stages only the
    first stage (one compile instead of one per sequence length; its figures then cover those steps alone, and
    "stages_timed" says so). An OOM is a result, not an exception."""
    flags = ctx.flags + extra_flags
    try:
        args = config_args(flags, ctx.on_gpu)
        tg.check_config(args, ctx.env.world_size)
    except SystemExit as e:
        if extra_flags and ctx.flags:
            raise Skip(f"{' '.join(extra_flags)} does not combine with --flags: {e}") from None
        raise
    ws, accum = ctx.env.world_size, args.micro_batches // ctx.env.world_size
    # CPU --quick: one timed step after the warm-up (eager CPU timings prove the path, they measure no GPU)
    warmup, repeats = (3, 5 if ctx.quick else 10) if ctx.on_gpu else (1, 1 if ctx.quick else 3)
    stash = ctx.stash if not extra_flags else {}
    model = stash.pop("model", None)
    try:
        if model is None:
            model = place_model(args, ctx.device)
            compiled = torch.compile(model, dynamic=False) if ctx.on_gpu and args.compile else model
            orthogonalize = torch.compile(tg.zeropower_via_newtonschulz5) if ctx.on_gpu and args.compile else None
        else:
            compiled, orthogonalize = stash.pop("compiled"), stash.pop("orthogonalize")
        ctx.stash.clear()
        optimizers = tg.build_optimizers(model, args, ctx.env.rank, ws)
        if orthogonalize is not None:
            optimizers[1].orthogonalize = orthogonalize
        setup, stages, peak = StepSetup(model, args, ctx.device), [], 0
        points = timed_steps(args)
        for n, (label, step, count) in enumerate(points[:1] if first_stage_only else points):
            # CPU (eager): only the model's first step has one-time costs (optimizer state); a later stage's new
            # sequence length compiles nothing there, so it needs no warm-up of its own
            warmup_here = warmup if ctx.on_gpu or n == 0 else 0
            window, seq_len = setup(step)
            if not args.stages:  # #21: the final, widest window (step num_iterations) at the last step's LR
                window = window_tensor(tg.long_window_blocks(args.num_iterations, args), ctx.device)
            batch = document_micro_batches(args, accum, ctx.device, seed=ctx.env.rank, seq_len=seq_len)
            times, loss = [], None
            for i in range(warmup_here + repeats):
                if i == warmup_here and ctx.on_gpu:
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                synchronize(ctx.device)
                t0 = time.perf_counter()
                loss = tg.train_step(compiled, optimizers, batch, window, args, step, ws)
                synchronize(ctx.device)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    ctx.progress(name, f"{label}{': ' if label else ''}first step"
                                       f"{' (compile included)' if compiled is not model else ''} {times[0]:.1f}s")
            loss = loss.item()
            if not math.isfinite(loss):
                raise CheckFailed(f"non-finite loss {loss} at {' '.join(flags) or 'the defaults'}"
                                  f"{', ' + label if label else ''}")
            ms = 1000 * statistics.median(times[warmup_here:])
            tokens = args.micro_batches * seq_len
            stage = dict(stage=label, step=step, steps=count, ms_per_step=round(ms, 2), tokens_per_step=tokens,
                         tokens_per_s=round(tokens / ms * 1000), first_step_s=round(times[0], 1))
            if ctx.on_gpu:
                stage["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30, 2)
                peak = max(peak, stage["peak_mem_gib"])
            stages.append(stage)
        # the run's figures: per step, weighted by the steps each timed point stands for (one point without stages)
        total_steps = sum(st["steps"] for st in stages)
        ms = sum(st["ms_per_step"] * st["steps"] for st in stages) / total_steps
        tokens = round(sum(st["tokens_per_step"] * st["steps"] for st in stages) / total_steps)
        fwd = forward_flops_per_token(model, args)
        result = dict(flags=flags, ms_per_step=round(ms, 2), tokens_per_step=tokens,
                      tokens_per_s=round(tokens / ms * 1000), grad_accum=accum, world_size=ws,
                      first_step_s=stages[0]["first_step_s"], fwd_flops_per_token=fwd, fp8_head=model.lm_head.use_fp8,
                      compiled=compiled is not model, repeats=repeats,
                      est_train_s=round(ms * total_steps / 1000, 1), steps=total_steps)
        if args.stages:
            result["stages"] = stages
        if len(stages) < len(points):
            result["stages_timed"] = f"{len(stages)} of {len(points)}"
        if ctx.on_gpu:
            result["peak_mem_gib"] = peak
            tflops = 3 * fwd * tokens / (ms / 1000) / ws / 1e12  # training ~ 3x the forward
            peak = peak_tflops(torch.cuda.get_device_name(ctx.device))
            result.update(tflops_per_gpu=round(tflops, 1), peak_tflops=peak,
                          mfu=round(tflops / peak, 4) if peak else None)
        else:
            import resource
            result["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        return result
    except torch.OutOfMemoryError as e:
        return dict(flags=flags, error="OOM", detail=str(e).splitlines()[0])
    finally:
        model = compiled = optimizers = batch = None
        ctx.stash.clear()
        ctx.release()


def timing_line(r: dict) -> str:
    if r.get("error") == "OOM":
        return f"out of memory with {' '.join(r['flags']) or 'the defaults'} (not fatal: this config does not fit)"
    mem = f"peak {r['peak_mem_gib']} GiB" if "peak_mem_gib" in r else f"max RSS {r['max_rss_gib']} GiB (process)"
    mfu = (f", {r['tflops_per_gpu']} TFLOP/s/GPU, MFU {r['mfu']:.1%}" if r.get("mfu") is not None else
           f", {r['tflops_per_gpu']} TFLOP/s/GPU, MFU unknown (GPU not in PEAK_BF16_TFLOPS)" if "tflops_per_gpu" in r
           else ", MFU n/a (CPU)")
    stages = "".join(f"; {st['stage']} {st['ms_per_step']:.1f} ms/step x {st['steps']} ({st['tokens_per_step']:,} "
                     f"tokens{', peak ' + str(st['peak_mem_gib']) + ' GiB' if 'peak_mem_gib' in st else ''})"
                     for st in r.get("stages", []))
    scope = (f" ({r['stages_timed']} stages timed: those steps only)" if "stages_timed" in r
             else " (mean over the stages)" if stages else "")
    return (f"{r['ms_per_step']:.1f} ms/step{scope}, {r['tokens_per_s']:,} "
            f"tokens/s ({r['tokens_per_step']:,} tokens/step, {r['grad_accum']}-way accumulation x "
            f"{r['world_size']} ranks), {mem}{mfu}, first step {r['first_step_s']}s, {r['steps']} steps = "
            f"{r['est_train_s']} s of training{stages}")


def record_timing(ctx: Context, key: str, result: dict) -> str:
    label = "" if ctx.on_gpu else "CPU smoke sizes, eager fp32 (not a GPU number): "
    ctx.timings[key] = result
    return label + timing_line(result)


@measurement("step_time", budgeted=False,
             fix="the recipe does not train here (see the detail); fix the checks above first")
def measure_step_time(ctx: Context) -> str:
    # --gpu_budget_s: a staged config's first stage only (each later one is one more compile)
    return record_timing(ctx, "step_time", time_config(ctx, "step_time", [],
                                                       first_stage_only=ctx.gpu_budget_s is not None))


@measurement("fp8_off", fix="the bf16 head does not train here (see the detail)")
def measure_fp8_off(ctx: Context) -> str:
    if not fp8_enabled(ctx.args, ctx.device):
        raise Skip("the FP8 head is not used on this device/config: identical to step_time")
    result = time_config(ctx, "fp8_off", ["--fp8_head=false"])
    base = ctx.timings.get("step_time", {}).get("ms_per_step")
    if base and "ms_per_step" in result:
        result["fp8_speedup"] = round(result["ms_per_step"] / base, 3)
    line = record_timing(ctx, "fp8_off", result)
    return line + (f"; the FP8 head saves {1 - base / result['ms_per_step']:.1%}" if "fp8_speedup" in result else "")


@measurement("allreduce_bandwidth", fix="collectives are slow or broken: check NCCL_* variables, `nvidia-smi topo -m`, "
                                        "NVLink/fabric manager status")
def measure_allreduce(ctx: Context) -> str:
    if ctx.env.world_size == 1:
        raise Skip("world size 1 (run under torchrun to measure NCCL bandwidth)")
    ws = ctx.env.world_size
    n = (1 << 26) if ctx.on_gpu else (1 << 20)  # 256 MiB of fp32 (CPU: 4 MiB)
    t = torch.ones(n, device=ctx.device)
    times = []
    for i in range(3 + 5):
        dist.barrier()
        synchronize(ctx.device)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        synchronize(ctx.device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times[3:])
    busbw = 4 * n * 2 * (ws - 1) / ws / sec / 1e9
    ctx.timings["allreduce"] = dict(bytes=4 * n, ms=round(sec * 1000, 2), bus_gbps=round(busbw, 1))
    return f"{4 * n / 2 ** 20:.0f} MiB all_reduce in {sec * 1000:.2f} ms: bus bandwidth {busbw:.1f} GB/s"


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_bench_rows(args: tg.Hyperparameters, device: torch.device, dtype, tokens: int, warmup: int,
                      repeats: int) -> list[dict]:
    """fwd+bwd time of the Kronecker (triton) and Monarch KS (triton) kernels and of the dense matmul of the same
    (out, in) at both MLP shapes, with tools/bench_kernels.py's impls and timer."""
    bench = load_tool("bench_kernels")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for in_f, out_f in ((args.model_dim, args.mlp_ratio * args.model_dim),
                        (args.mlp_ratio * args.model_dim, args.model_dim)):
        x = torch.randn(tokens, in_f, device=device, generator=g).to(dtype).requires_grad_()
        dy = torch.randn(tokens, out_f, device=device, generator=g).to(dtype)
        layer = kernels.KronLinear(in_f, out_f, rank=args.kron_rank).to(device, dtype)
        A, B = layer.A.detach().requires_grad_(), layer.B.detach().requires_grad_()
        W = kernels.kron_dense_weight(A, B).detach().requires_grad_()
        fns = bench.make_impls(["dense", "triton"], A, B, W)
        patterns = kernels.monarch_patterns(out_f, in_f, rank=args.ks_rank)
        ks_weights = [w.detach().to(dtype).requires_grad_() for w in kernels.KSLinear(patterns).to(device).factors]
        fns["ks_triton"] = lambda x_: kernels.ks_chain(x_, ks_weights, patterns, "triton")
        params = {"dense": (W,), "triton": (A, B), "ks_triton": tuple(ks_weights)}
        times = {impl: bench.time_ms(lambda fn=fn, ps=params[impl]: torch.autograd.grad(fn(x), (x, *ps), dy),
                                     warmup, repeats, device) for impl, fn in fns.items()}
        for impl, label in (("dense", "dense"), ("triton", "kron_triton"), ("ks_triton", "ks_monarch_triton")):
            rows.append(dict(shape=f"{in_f}->{out_f}", impl=label, tokens=tokens, fwd_bwd_ms=round(times[impl], 3),
                             vs_dense=round(times[impl] / times["dense"], 2)))
    return rows


@measurement("kernel_bench", fix="the Triton kernels failed to run (see kron_ks_kernels)")
def measure_kernels(ctx: Context) -> str:
    if not ctx.on_gpu:
        raise Skip("GPU only (CPU timings of the Triton interpreter mean nothing)")
    tokens = ctx.args.seq_len
    rows = kernel_bench_rows(ctx.args, ctx.device, torch.bfloat16, tokens, 3, 5 if ctx.quick else 10)
    ctx.timings["kernel_bench"] = rows
    return "; ".join(f"{r['shape']} {r['impl']} {r['fwd_bwd_ms']} ms ({r['vs_dense']}x dense)" for r in rows
                     if r["impl"] != "dense") + f" (fwd+bwd, {tokens} tokens, bf16)"


def register_overhead(name: str, flags: Callable[[tg.Hyperparameters], list[str]], quick: bool, fix: str = ""):
    @measurement(f"overhead_{name}", quick=quick, fix=fix or "this variant does not train here (see the detail); "
                                                             "runs without its flag are unaffected")
    def measure(ctx: Context) -> str:
        extra = flags(ctx.args)
        result = time_config(ctx, f"overhead_{name}", extra)
        base = ctx.timings.get("step_time", {}).get("ms_per_step")
        if base and "ms_per_step" in result:
            result["overhead_vs_default"] = round(result["ms_per_step"] / base - 1, 4)
        ctx.timings.setdefault("overhead", {})[" ".join(extra)] = result
        line = ("" if ctx.on_gpu else "CPU smoke sizes: ") + timing_line(result)
        if "overhead_vs_default" in result:
            line = f"{' '.join(extra)}: {result['overhead_vs_default']:+.1%} vs default at equal tokens; " + line
        return line
    return measure


MOT_FIX = ("--mot does not train here (see the detail); its byte table needs tiktoken's GPT-2 files once (set "
           "TIKTOKEN_CACHE_DIR, or copy data/local/byte_table_gpt2_<n>.pt from a machine that has it)")
for _name, _flags, _quick, _fix in (
        ("gqa", lambda a: [f"--n_kv_heads={gqa_heads(a.num_heads)}"], True, ""),
        ("moe", lambda a: ["--moe_experts=8", "--moe_shared=1"], True, ""),
        ("mla", lambda a: [f"--mla_kv_rank={a.model_dim // 3}", f"--mla_q_rank={a.model_dim // 2}"], False, ""),
        ("kron_mlp", lambda a: ["--kron_mlp=both"], False, ""),
        ("ks_mlp", lambda a: ["--ks_mlp=both"], False, ""),
        ("mot_cross", lambda a: ["--mot=cross"], False, MOT_FIX),
        ("mot_cross_self", lambda a: ["--mot=cross+self"], False, MOT_FIX)):
    register_overhead(_name, _flags, _quick, _fix)


@measurement("step_time_frontier", quick=False,
             fix="the frontier preset does not train here (see the detail); runs without it are unaffected")
def measure_step_time_frontier(ctx: Context) -> str:
    """ms/step of --preset=frontier (CPU: frontier_smoke) with --flags at its first stage: one compile, where all of
    its stages would take one per sequence length (--flags="--preset=frontier" times them all)."""
    if ctx.args.preset in ("frontier", "frontier_smoke"):
        raise Skip(f"--flags already use --preset={ctx.args.preset}: step_time times it")
    preset = "frontier" if ctx.on_gpu else "frontier_smoke"
    return record_timing(ctx, "step_time_frontier", time_config(ctx, "step_time_frontier", [f"--preset={preset}"],
                                                                first_stage_only=True))


def memory_plan_for(flags: list[str], gpu_name: str, total_bytes: int, capability: tuple[int, int],
                    world_size: int) -> dict:
    """tools/memory_plan.py's plan (plan_memory) of the run the flags describe (recipe defaults + flags) on
    world_size GPUs like this one."""
    module = load_tool("memory_plan")
    args = config_args(flags, on_gpu=True)
    tg.check_config(args, world_size)
    gpu = module.Gpu(gpu_name, round(total_bytes / 2 ** 30), tuple(capability))
    return module.plan_memory(args, gpu, world_size)


def peak_vs_plan(measured_gib: float, plan: dict | None) -> tuple[str, bool]:
    """(line, within) for a peak train_step allocated (torch.cuda.max_memory_allocated) against the plan's peak of
    the whole run: eager memory at its largest phase plus the CUDA context and NCCL, which the allocator does not
    see, so an upper bound at any stage; within: measured <= that bound. No plan: the measured peak alone."""
    if plan is None:
        return f"{measured_gib:.2f} GiB (no plan to compare)", True
    bound, compiled = plan["peak"] / 2 ** 30, plan["compiled_estimate"] / 2 ** 30
    within = measured_gib <= bound
    return (f"{measured_gib:.2f} GiB vs the plan's {bound:.2f} GiB bound (compiled estimate {compiled:.2f} GiB)"
            f"{'' if within else ': ABOVE the bound'}"), within


@measurement("peak_memory", fix="a measured peak is above tools/memory_plan.py's bound for the same run: the plan "
                                "undercounts, so --plan's verdicts cannot be trusted until it is fixed (report the "
                                "detail)")
def measure_peak_memory(ctx: Context) -> str:
    """The peak memory step_time and step_time_frontier measured, each against the memory plan of its flags."""
    if not ctx.on_gpu:
        raise Skip("GPU only (a CPU timing records the process's max RSS)")
    measured = {key: ctx.timings[key] for key in ("step_time", "step_time_frontier")
                if "peak_mem_gib" in ctx.timings.get(key, {})}
    if not measured:
        raise Skip("no timing measured a peak (step_time and step_time_frontier did not run)")
    props = torch.cuda.get_device_properties(ctx.device)
    rows, lines, above = {}, [], []
    for key, r in measured.items():
        plan = memory_plan_for(r["flags"], props.name, props.total_memory, (props.major, props.minor),
                               ctx.env.world_size)
        line, within = peak_vs_plan(r["peak_mem_gib"], plan)
        stage = f", {r['stages_timed']} stages" if "stages_timed" in r else ""
        lines.append(f"{key} ({' '.join(r['flags']) or 'defaults'}{stage}): {line}")
        rows[key] = dict(measured_gib=r["peak_mem_gib"], within=within)
        if plan is not None:
            rows[key].update(plan_peak_gib=round(plan["peak"] / 2 ** 30, 2),
                             plan_compiled_gib=round(plan["compiled_estimate"] / 2 ** 30, 2))
        if not within:
            above.append(lines[-1])
    ctx.timings["peak_memory"] = rows
    if above:
        raise CheckFailed("; ".join(above))
    return "; ".join(lines)


# -----------------------------------------------------------------------------------------------------------------
# Report: the preflight line, JSON and Markdown under records/preflight/


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:48]


def json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def markdown(report: dict) -> str:
    def cell(text) -> str:
        return str(text).splitlines()[0].replace("|", "\\|") if str(text) else ""
    env = report["environment"]
    lines = [f"# Preflight {report['date']} on {report['device']} ({'ok' if report['ok'] else 'FAILED'})", "",
             f"- mode: {'quick' if report['quick'] else 'full'}, world size {report['world_size']}, flags: "
             f"`{' '.join(report['flags']) or '(defaults)'}`, {report['seconds']:.0f}s",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
             f"{env.get('driver')}, commit {env.get('git_commit')}", ""]
    if report.get("gpu_budget"):
        b = report["gpu_budget"]
        timed_out = [r["name"] for r in report["skipped"] if r["why"].startswith("time budget")]
        lines[-1:-1] = [f"- --gpu_budget_s={b['budget_s']:g}: {b['spent_s']:.0f}s spent ({b['startup_s']:.0f}s of "
                        f"it startup), estimates x {b['scale']}; skipped for time: {', '.join(timed_out) or 'none'}"]
    if report["device_type"] == "cpu":
        lines += ["CPU run at smoke sizes (fp32, eager timings): proves the code paths, says nothing about GPU speed.",
                  ""]
    for title, key in (("Checks", "checks"), ("Measurements", "measurements")):
        lines += [f"## {title}", "", "| name | result | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {cell(r['detail'])} |" for r in report[key]]
        lines.append("")
    configs = [("default", report["timings"].get("step_time")), ("--fp8_head=false", report["timings"].get("fp8_off")),
               ("frontier preset, first stage", report["timings"].get("step_time_frontier"))]
    configs += list(report["timings"].get("overhead", {}).items())
    configs = [(n, r) for n, r in configs if r]
    if configs:
        lines += ["## Step time", "", "| config | ms/step | tokens/s | peak memory GiB | MFU | vs default | "
                  "training s (steps x ms/step) |", "|---|---|---|---|---|---|---|"]
        for n, r in configs:
            if "ms_per_step" not in r:
                lines.append(f"| `{n}` | {r.get('error', '?')} | | | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "unknown" if "tflops_per_gpu" in r else "n/a"
            over = f"{r['overhead_vs_default']:+.1%}" if "overhead_vs_default" in r else ""
            lines.append(f"| `{n}` | {r['ms_per_step']} | {r['tokens_per_s']:,} | "
                         f"{r.get('peak_mem_gib', r.get('max_rss_gib'))} | {mfu} | {over} | {r['est_train_s']} |")
        lines.append("")
        stages = report["timings"].get("step_time", {}).get("stages")
        if stages:  # --stages: each stage at its own sequence length and windows
            lines += ["## Step time per stage", "", "| stage | steps | tokens/step | ms/step | tokens/s | peak memory "
                      "GiB |", "|---|---|---|---|---|---|"]
            lines += [f"| {st['stage']} | {st['steps']} | {st['tokens_per_step']:,} | {st['ms_per_step']} | "
                      f"{st['tokens_per_s']:,} | {st.get('peak_mem_gib', '')} |" for st in stages]
            lines.append("")
    if report["timings"].get("kernel_bench"):
        lines += ["## Kernels (fwd+bwd, bf16)", "", "| shape | impl | ms | vs dense |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['impl']} | {r['fwd_bwd_ms']} | {r['vs_dense']}x |"
                  for r in report["timings"]["kernel_bench"]]
        lines.append("")
    failures = [r for r in report["checks"] + report["measurements"] if r["status"] == "fail"]
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines += [f"### {r['name']}", "", "```", r["detail"], "```", "", f"Fix: {r['fix']}", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """<date>_<device>.json and .md, with _2, _3, ... if either exists: never overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}_{slug(report['device'])}" + (f"-x{report['world_size']}" if report["world_size"] > 1
                                                             else "")
    for n in range(1, 1000):
        name = stem if n == 1 else f"{stem}_{n}"
        paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
        if any(p.exists() for p in paths):
            continue
        try:
            files = [open(p, "x") for p in paths]
        except FileExistsError:
            continue
        report["files"] = [str(p) for p in paths]
        with files[0], files[1]:
            files[0].write(json.dumps(json_safe(report), indent=1) + "\n")
            files[1].write(markdown(report) + "\n")
        return paths
    raise SystemExit(f"error: no free file name for {stem} in {out_dir}")


# -----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile (--aot): every Triton kernel the flags launch, compiled for named GPUs without one


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (CUDA programming guide, occupancy tables); sms: a typical part's
    SM count, used only for the grid the launchers pick."""
    cc: int
    shared_block: int  # bytes of shared memory one block may use (opt-in maximum)
    shared_sm: int  # bytes per SM (each resident block also reserves 1 KiB)
    warps: int  # resident warps per SM
    blocks: int  # resident blocks per SM
    sms: int
    part: str


AOT_ARCHS = {
    "sm_80": ArchLimits(80, 163 * 1024, 164 * 1024, 64, 32, 108, "A100"),
    "sm_86": ArchLimits(86, 99 * 1024, 100 * 1024, 48, 16, 84, "A40"),
    "sm_89": ArchLimits(89, 99 * 1024, 100 * 1024, 48, 24, 142, "L40S"),
    "sm_90": ArchLimits(90, 227 * 1024, 228 * 1024, 64, 32, 132, "H100 SXM"),
}
REGS_PER_SM, MAX_REGS_PER_THREAD, MAX_THREADS_PER_BLOCK = 64 * 1024, 255, 1024


def aot_launches(args: tg.Hyperparameters, sms: int, arch: str | None = None,
                 every_config: bool = False) -> list[tuple[str, kernels.KernelLaunch]]:
    """(label, launch) for every Triton launch of one training micro-step (forward + backward at each stage's
    seq_len) and one validation forward (val_seq_len) of the model the flags build on a GPU, computed by the
    launchers' own plan functions on meta tensors (bf16 activations, the model's fp32 factors); duplicates kept.
    Each launch takes the config the launchers' table (kernels.config_table) picks for arch (None: the defaults);
    every_config: each launch once per config of its space instead (launch.config says which)."""
    with torch.device("meta"):
        model = tg.build_model(args)
    train_tokens = sorted({st.seq_len for st in tg.training_stages(args)} if args.stages else {args.seq_len})
    out = []
    for name, m in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(m, kernels.KronLinear) and m.impl in ("auto", "triton"):
            layers = [(f"kron {short} {m.in_features}->{m.out_features}", m.in_features, m.A.dtype,
                       lambda x, configs=None, m=m: kernels.kron_apply_launches(x, m.A, m.B, sms=sms,
                                                                                 configs=configs))]
        elif isinstance(m, kernels.KSLinear) and m.impl in ("auto", "triton"):
            layers = [(f"ks {short}[{i}] {m.patterns[i]}", kernels.ks_in_features(m.patterns[i]), w.dtype,
                       lambda x, configs=None, w=w, p=m.patterns[i], bl=m.bs_last:
                       kernels.ks_apply_launches(x, w, p, bl, sms=sms, configs=configs))
                      for i, w in enumerate(m.factors)]
        else:
            continue
        for tokens, backward in [(t, True) for t in train_tokens] + [(args.val_seq_len, False)]:
            bs_last = isinstance(m, kernels.KSLinear) and m.bs_last
            x = torch.empty((layers[0][1], tokens) if bs_last else (tokens, layers[0][1]), device="meta",
                            dtype=torch.bfloat16)
            for label, _, _, plan in layers:
                y, launches = plan(x)
                for kind, launch in launches.items():
                    if backward or kind == "forward":
                        configs = launch.space if every_config else [kernels.pick_config(launch.key, launch.space,
                                                                                         arch)]
                        out += [(f"{label} {kind}", launch if c == launch.config else plan(x, {kind: c})[1][kind])
                                for c in configs]
                x = y
    return out


def launch_spec(launch: kernels.KernelLaunch, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT would specialize it (ints equal to 1 become
    constexprs; pointers and ints divisible by 16 get divisibility hints), for triton.compile's ASTSource."""
    from triton._C.libtriton import native_specialize_impl
    names = launch.kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        kind, spec = native_specialize_impl(type(backend), value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif spec:
            attrs[(i,)] = backend.parse_attr(spec)
    for name, value in launch.constexprs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    return signature, constexprs, attrs


def cubin_usage(cubin: bytes) -> dict:
    """Registers per thread, stack and local bytes per thread, static shared bytes, by Triton's bundled cuobjdump."""
    import tempfile
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, found.groups())))


def compile_usage(flags: list[str], archs: list[str], part: int = 0, parts: int = 1) -> list[dict]:
    """One row per distinct kernel and arch over every config of each launch's space the flags make (aot_launches
    with every_config): what it needs (registers, stack, shared memory) as Triton's ptxas builds it for that GPU,
    its "config" [block, num_warps, num_stages], "default" (the space's first entry) and "uses": [label, table key,
    space, grid, position] of each launch site compiling to it (aot_views sorts out which of them run). Each
    distinct kernel compiles once; part of parts: only every parts-th of them from the part-th (aot_usage splits the
    work so). Needs real (not interpreted) Triton kernels: see aot_usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    args = config_args(flags, on_gpu=True)
    out = []
    for arch in archs:
        lim = AOT_ARCHS[arch]
        target = GPUTarget("cuda", lim.cc, 32)
        backend = make_backend(target)
        rows = {}
        for pos, (label, launch) in enumerate(aot_launches(args, lim.sms, every_config=True)):
            signature, constexprs, attrs = launch_spec(launch, backend)
            key = (launch.kernel.fn.__name__, repr(signature), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), launch.num_warps, launch.num_stages)
            use = [label, launch.key, [list(c) for c in launch.space], list(launch.grid), pos]
            if key in rows:
                rows[key][1]["uses"].append(use)
                continue
            rows[key] = (launch, dict(arch=arch, config=list(launch.config), default=launch.config == launch.space[0],
                                      constexprs=launch.constexprs, uses=[use]), signature, constexprs, attrs)
        for n, (launch, row, signature, constexprs, attrs) in enumerate(rows.values()):
            if n % parts != part:
                continue
            options = {"num_warps": launch.num_warps}
            if launch.num_stages is not None:
                options["num_stages"] = launch.num_stages
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options)
            usage = cubin_usage(compiled.asm["cubin"])
            out.append(dict(row, kernel=compiled.metadata.name, regs=usage["regs"],
                            stack=usage["stack"] + usage["local"],
                            shared=compiled.metadata.shared + usage["static_shared"],
                            num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages))
    return out


_AOT_USAGE = {}  # (flags, archs) -> aot_usage's rows: compiled once per process (tests ask several times)


def aot_usage(flags: list[str], archs: list[str]) -> list[dict]:
    """compile_usage, split over child processes run side by side (one per 24 kernels, at most one per CPU and 8),
    each without TRITON_INTERPRET (imported under it, as in the tests, this process's kernels are interpreted ones,
    which cannot be compiled); here when one process does and this one's kernels are compiled. Rows sorted by
    arch, then first use."""
    import triton
    memo = (tuple(flags), tuple(archs))
    if memo in _AOT_USAGE:
        return _AOT_USAGE[memo]
    args = config_args(flags, on_gpu=True)
    n_kernels = len(archs) * len({(l.key, l.config) for _, l in aot_launches(args, 1, every_config=True)})
    workers = max(1, min(8, os.cpu_count() or 1, -(-n_kernels // 24)))
    if workers == 1 and isinstance(kernels._kron_apply_kernel, triton.runtime.jit.JITFunction):
        rows = compile_usage(flags, archs)
    else:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import preflight; print('aot_rows: ' + "
                "json.dumps(preflight.compile_usage(json.loads(sys.argv[2]), sys.argv[3].split(','), "
                "int(sys.argv[4]), int(sys.argv[5]))))")
        children = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tools"), json.dumps(flags),
                                      ",".join(archs), str(part), str(workers)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for part in range(workers)]
        rows = []
        for child in children:
            stdout, stderr = child.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("aot_rows: ")]
            if child.returncode or not lines:
                raise RuntimeError(f"AOT compile in a child process failed (exit {child.returncode}):\n"
                                   f"{stderr[-4000:]}")
            rows += json.loads(lines[-1][len("aot_rows: "):])
    _AOT_USAGE[memo] = sorted(rows, key=lambda r: (archs.index(r["arch"]), r["uses"][0][4]))
    return _AOT_USAGE[memo]


def aot_views(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kernels, configs) of aot_usage's rows: "kernels" one row per distinct kernel and arch the flags launch
    (each launch's config the one the table picks for that arch, else its default), with its "sites"; "configs"
    every row, "chosen" when some site launches it. Label and grid: those of the first (launching) site."""
    kernels_rows, configs = [], []
    for row in rows:
        uses = [(u, kernels.pick_config(u[1], [kernels.KernelConfig(*c) for c in u[2]], row["arch"])
                 == kernels.KernelConfig(*row["config"])) for u in row["uses"]]
        launched = [u for u, chosen in uses if chosen]
        base = {k: v for k, v in row.items() if k != "uses"}
        configs.append(dict(base, label=row["uses"][0][0], sites=[u[0] for u in row["uses"]],
                            grid=row["uses"][0][3], chosen=bool(launched)))
        if launched:
            kernels_rows.append(dict(base, label=launched[0][0], sites=[u[0] for u in launched], grid=launched[0][3],
                                     chosen=True, pos=launched[0][4]))
    arch_order = {arch: i for i, arch in enumerate(dict.fromkeys(r["arch"] for r in rows))}
    kernels_rows.sort(key=lambda r: (arch_order[r["arch"]], r.pop("pos")))
    return kernels_rows, configs


def blocks_per_sm(row: dict, lim: ArchLimits) -> int:
    """Resident blocks per SM the kernel's registers (allocated per warp in units of 256), warps and shared memory
    (plus 1 KiB reserved per block) allow."""
    warps = row["num_warps"]
    regs_per_warp = math.ceil(max(row["regs"], 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_shared = lim.shared_sm // (row["shared"] + 1024) if row["shared"] else lim.blocks
    return min(by_regs, lim.warps // warps, by_shared, lim.blocks)


def aot_verdict(row: dict) -> tuple[list[str], list[str]]:
    """(failures, warnings) of one row against its arch's limits; over a limit fails, a stack (spills) warns."""
    lim, arch, name = AOT_ARCHS[row["arch"]], row["arch"], f"{row['kernel']} ({row['label']})"
    fails = []
    if row["shared"] > lim.shared_block:
        fails.append(f"{name} on {arch}: {row['shared']} B shared memory per block, over the {arch} limit "
                     f"{lim.shared_block} B ({lim.shared_block // 1024} KiB)")
    if row["regs"] > MAX_REGS_PER_THREAD:
        fails.append(f"{name} on {arch}: {row['regs']} registers per thread, over the limit {MAX_REGS_PER_THREAD}")
    if row["num_warps"] * 32 > MAX_THREADS_PER_BLOCK or row["num_warps"] > lim.warps:
        fails.append(f"{name} on {arch}: {row['num_warps']} warps per block, over the {arch} limit "
                     f"{min(lim.warps, MAX_THREADS_PER_BLOCK // 32)}")
    if not fails and blocks_per_sm(row, lim) < 1:
        fails.append(f"{name} on {arch}: not one block fits an SM ({row['regs']} registers x {row['num_warps']} "
                     f"warps vs {REGS_PER_SM} registers, {row['shared']} B vs {lim.shared_sm} B shared memory per SM)")
    warns = [f"{name} on {arch}: {row['stack']} B stack per thread (spills or a local array; {row['regs']} registers)"] \
        if row["stack"] else []
    return fails, warns


def config_label(config: list) -> str:
    return kernels.KernelConfig(*config).label()


def run_aot(flags: list[str], archs: list[str]) -> int:
    """--aot: print one line per (kernel, arch) the flags launch, then every config of each launch's space, then
    `preflight: {json}`; 1 when a launched kernel is over a limit (a config over one that is not launched is left out
    of that arch's space, with its reason, and fails only if a table picks it)."""
    args = config_args(flags, on_gpu=True)
    tg.check_config(args, 1)
    print(f"preflight --aot for {', '.join(archs)} (triton ptxas, no GPU needed); flags: {' '.join(flags) or 'defaults'}"
          f"; config table: {kernels.config_table_path() or 'none (every launch its default)'}", flush=True)
    start = time.perf_counter()
    try:
        for arch in archs:  # a table entry outside its launch's space stops here, before any compile
            aot_launches(args, AOT_ARCHS[arch].sms, arch)
    except kernels.KernelConfigError as e:
        print(f"preflight: {e}", file=sys.stderr)
        return 2
    rows, configs = aot_views(aot_usage(flags, archs)) if aot_launches(args, 1) else ([], [])
    fails, warns, excluded = [], [], []
    if not rows:
        print("[PASS] aot: these flags launch no Triton kernel (dense MLP, or --kron_impl=torch/dense, "
              "--ks_impl=bmm)", flush=True)
    for row in rows:
        lim = AOT_ARCHS[row["arch"]]
        row_fails, row_warns = aot_verdict(row)
        fails += row_fails
        warns += row_warns
        row["blocks_per_sm"] = blocks_per_sm(row, lim)
        status = "FAIL" if row_fails else "WARN" if row_warns else "PASS"
        more = f" (+{len(row['sites']) - 1} same)" if len(row["sites"]) > 1 else ""
        print(f"[{status}] {row['arch']} {row['kernel']:26s} {row['label']}{more}: {row['regs']} regs, "
              f"{row['stack']} B stack, {row['shared']} B shared, {row['num_warps']} warps, "
              f"{row['num_stages']} stages, {row['blocks_per_sm']} blocks/SM, grid {tuple(row['grid'])} "
              f"({lim.part}, {lim.sms} SMs; {config_label(row['config'])}"
              f"{', the default' if row['default'] else ', from the config table'})", flush=True)
    if configs:
        print(f"every config of each launch's space ({len(configs)} kernels compiled; * = launched, "
              f"the default unless a table picks another; spills = stack bytes per thread):", flush=True)
    for row in configs:
        lim = AOT_ARCHS[row["arch"]]
        row_fails, _ = aot_verdict(row)
        row["blocks_per_sm"] = blocks_per_sm(row, lim)
        row["status"] = "excluded" if row_fails else "spills" if row["stack"] else "ok"
        print(f"  {'*' if row['chosen'] else ' '} {row['arch']} {row['label']:40s} {config_label(row['config']):32s} "
              f"{row['regs']:3d} regs {row['stack']:5d} B stack {row['shared']:6d} B shared "
              f"{row['blocks_per_sm']:2d} blocks/SM  {row['status']}", flush=True)
        if row_fails and not row["chosen"]:
            excluded += [f"{line}; {config_label(row['config'])} is left out of the {row['arch']} space"
                         for line in row_fails]
    for line in warns:
        print(f"WARN aot: {line}", flush=True)
    for line in excluded:
        print(f"EXCLUDED aot: {line}", flush=True)
    for line in fails:
        print(f"FAIL aot: {line}", flush=True)
    table = kernels.config_table_path()
    report = dict(mode="aot", ok=not fails, archs=archs, flags=flags, kernels=rows, configs=configs,
                  failures=fails, warnings=warns, excluded=excluded, config_table=str(table) if table else None,
                  seconds=round(time.perf_counter() - start, 1))
    print(f"preflight: {json.dumps(json_safe(report))}", flush=True)
    return 0 if report["ok"] else 1


# -----------------------------------------------------------------------------------------------------------------
# Main


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 3 minutes: fewer cases, steps and variants")
    parser.add_argument("--out", help="directory for the .json/.md report (default records/preflight)")
    parser.add_argument("--flags", default="", help='train_gpt flags of the run to prove, e.g. "--mot=cross"')
    parser.add_argument("--only", default="", help="comma-separated entries to run (see --list)")
    parser.add_argument("--budget_s", type=float, help="start no measurement past this many seconds "
                                                       "(default 570, --quick 170)")
    parser.add_argument("--gpu_budget_s", type=float,
                        help="one GPU call of this many seconds (counted from the process's start): --quick sizes, "
                             "every entry in order of value (GPU-only checks, then ms/step of the default and the "
                             "frontier's first stage, then peak memory, then the rest), each estimated first and "
                             "skipped if it would not end in time")
    parser.add_argument("--list", action="store_true", help="list the checks and measurements, then exit")
    parser.add_argument("--aot", action="store_true", help="no GPU needed: compile every Triton kernel the --flags "
                                                       "launch for --arch and check registers, spills, shared "
                                                       "memory and blocks/SM against each GPU's limits")
    parser.add_argument("--arch", default=",".join(AOT_ARCHS), help=f"--aot targets, of {', '.join(AOT_ARCHS)}")
    parser.add_argument("--plan", action="store_true", help="no GPU needed: the per-GPU memory of the --flags run "
                                                        "on --nproc x --gpu, whether it fits, the torchrun line "
                                                        "(tools/memory_plan.py)")
    parser.add_argument("--gpu", help="--plan: h100, h200, a100-40, a100-80, l40s or 4090")
    parser.add_argument("--nproc", type=int, default=1, help="--plan: GPUs of the run (one process each)")
    argv = list(argv)
    for i, item in enumerate(argv[:-1]):  # `--flags "--mot=cross"`: argparse would take the value for an option
        if item == "--flags":
            argv[i:i + 2] = [f"--flags={argv[i + 1]}"]
            break
    return parser.parse_args(argv)


def select_entries(cli: argparse.Namespace, registry: list[Entry]) -> list[tuple[Entry, bool]]:
    """(entry, runs) pairs; --only picks entries by name (even those --quick leaves out); --gpu_budget_s offers
    every entry, in budget_order (the budget, not --quick, decides what runs)."""
    names = [n.strip() for n in cli.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {e.name for e in registry})
    if unknown:
        raise SystemExit(f"error: unknown entries {unknown}; valid: {', '.join(e.name for e in registry)}")
    if cli.gpu_budget_s is not None:
        return budget_order([(e, True) for e in registry if e.name in names or not names])
    if names:
        return [(e, True) for e in registry if e.name in names]
    return [(e, e.quick or not cli.quick) for e in registry]


def budget_order(pairs: list[tuple[Entry, bool]]) -> list[tuple[Entry, bool]]:
    """GPU_BUDGET_FIRST's entries in its order, then the others in their own (registry) order."""
    first = {name: i for i, name in enumerate(GPU_BUDGET_FIRST)}
    return sorted(pairs, key=lambda pair: first.get(pair[0].name, len(first)))  # a stable sort


def main(argv: list[str] | None = None, registry: list[Entry] | None = None) -> int:
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    registry = REGISTRY if registry is None else registry
    if cli.list:  # with --gpu_budget_s: in its order, with each entry's expected seconds
        budget = cli.gpu_budget_s is not None
        for e, _ in budget_order([(e, True) for e in registry]) if budget else [(e, True) for e in registry]:
            cost = f" ~{GPU_BUDGET_COST_S.get(e.name, GPU_BUDGET_OTHER_S)}s on one H100 (a guess)" if budget else ""
            print(f"{e.name:22s} {e.kind:8s} {'quick' if e.quick else 'full only'}{cost}")
        return 0
    if cli.plan:  # a CPU-only plan (tools/memory_plan.py): no device, no process group
        return load_tool("memory_plan").cli(cli.flags, cli.gpu, cli.nproc, prog="preflight")
    try:
        flags = shlex.split(cli.flags)
        on_gpu = torch.cuda.is_available()
        config_args(flags, on_gpu)  # a bad flag stops here, before any process group exists
        entries = select_entries(cli, registry)
        if cli.gpu_budget_s is not None and cli.budget_s is not None:
            raise SystemExit("error: --budget_s and --gpu_budget_s both given: --gpu_budget_s budgets every entry "
                             "itself; pass one of them")
        if cli.gpu_budget_s is not None and not cli.gpu_budget_s > 0:
            raise SystemExit(f"error: --gpu_budget_s={cli.gpu_budget_s:g} must be > 0: the seconds of the GPU call "
                             f"(e.g. --gpu_budget_s=480)")
    except SystemExit as e:
        print(f"preflight: {e}" if str(e).startswith("error") else f"preflight: error: {e}", file=sys.stderr)
        return 2
    if cli.aot:
        archs = [a.strip() for a in cli.arch.split(",") if a.strip()]
        unknown = sorted(set(archs) - set(AOT_ARCHS))
        if unknown or not archs:
            print(f"preflight: error: --arch {cli.arch!r}: valid: {', '.join(AOT_ARCHS)}", file=sys.stderr)
            return 2
        try:
            return run_aot(flags, archs)
        except SystemExit as e:
            print(f"preflight: {e}", file=sys.stderr)
            return 2
    env = tg.setup_distributed()
    try:
        args = config_args(flags, env.device.type == "cuda")
        tg.check_config(args, env.world_size)
    except SystemExit as e:
        if env.master:
            print(f"preflight: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    budget = cli.budget_s if cli.budget_s is not None else (170.0 if cli.quick else 570.0)
    quick = cli.quick or cli.gpu_budget_s is not None
    ctx = Context(env=env, args=args, flags=flags, quick=quick, budget_s=budget, gpu_budget_s=cli.gpu_budget_s,
                  startup_s=process_age_s())
    mode = (f"--gpu_budget_s={cli.gpu_budget_s:g}: quick sizes, most valuable first, {ctx.startup_s:.0f}s of startup "
            f"spent" if cli.gpu_budget_s is not None else "quick" if quick else "full")
    ctx.say(f"preflight on {tg.device_name(env.device)} x{env.world_size} ({mode}; "
            f"torch {torch.__version__}; flags: {' '.join(flags) or 'defaults'}"
            f"{'' if env.device.type == 'cuda' else '; CPU: smoke preset sizes'})")
    results = {"check": [], "measure": []}
    for entry, runs in entries:
        if runs:
            results[entry.kind].append(run_entry(ctx, entry))
        else:
            result = dict(name=entry.name, ok=True, status="skip", detail="skipped: not in --quick", seconds=0.0)
            ctx.say(result_line(result))
            results[entry.kind].append(result)
    checks_ok = all(r["ok"] for r in results["check"])
    measurements_ok = all(r["ok"] for r in results["measure"])
    report = dict(ok=checks_ok and measurements_ok, checks_ok=checks_ok, measurements_ok=measurements_ok,
                  device=tg.device_name(env.device), device_type=env.device.type, world_size=env.world_size,
                  quick=quick, flags=flags, date=datetime.date.today().isoformat(),
                  seconds=round(time.perf_counter() - ctx.start, 1), environment=ctx.info,
                  checks=results["check"], measurements=results["measure"],
                  skipped=[dict(name=r["name"], why=r["detail"].removeprefix("skipped: "))
                           for r in results["check"] + results["measure"] if r["status"] == "skip"],
                  timings=dict(ctx.timings, label="GPU, bf16" if ctx.on_gpu else
                               "CPU smoke sizes, fp32, eager: not representative of any GPU"))
    if cli.gpu_budget_s is not None:  # the run order and what the estimates were made of
        report["gpu_budget"] = dict(budget_s=cli.gpu_budget_s, startup_s=round(ctx.startup_s, 1),
                                    spent_s=round(ctx.spent_s, 1), reserve_s=GPU_BUDGET_RESERVE_S,
                                    scale=round(budget_scale(ctx.budget_runs), 2), order=[e.name for e, _ in entries])
    if env.master:
        write_report(report, Path(cli.out) if cli.out else ROOT / "records" / "preflight")
        print(f"preflight: {json.dumps(json_safe(report))}", flush=True)
        failed = [r for r in results["check"] + results["measure"] if not r["ok"]]
        for r in failed:
            print(f"preflight FAILED {r['name']}: {r['detail'].splitlines()[0]}\n  fix: {r['fix']}", file=sys.stderr)
        if not failed:
            print(f"preflight passed in {report['seconds']:.0f}s: {report['files'][0]}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
