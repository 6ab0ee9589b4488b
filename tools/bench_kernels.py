"""Benchmark Kronecker-factorized linear layers against a dense matmul on the GPT-2 MLP shapes.

    python tools/bench_kernels.py                           # GPU: bf16, all impls, 49152 and 393216 tokens
    python tools/bench_kernels.py --device cpu              # CPU smoke run: fp32, 256 tokens, seconds
    python tools/bench_kernels.py --ks --rank 4             # KS factors and chains instead, 25088 tokens
    python tools/bench_kernels.py --tune && python tools/bench_kernels.py --tune --ks   # GPU: kernel_configs.json

For every (in, out) shape, token count, impl and pass (fwd, fwd_bwd) it prints one row: the median time (ms),
the time over the dense matmul's (x dense), the achieved bandwidth (GB/s) and FLOP rate (TFLOP/s), on a GPU the
bandwidth as a % of --peak_gbps (the memory roofline), and the forward's relative error against the dense
weight. Each result is appended as a JSON line to <out_dir>/<date>_<device>.jsonl. Bandwidth uses the minimal
traffic of the op (activations in/out once, weights once), the same for every impl, so it reads as "how close to
a perfectly fused kernel"; FLOPs are each method's own algorithmic count.

On CPU the defaults are small (256 tokens, 1 warm-up, 3 repeats; with --ks the whole chains only), so a run takes
seconds (--ks: under a minute), and there is no roofline column (--peak_gbps is a GPU's memory bandwidth). The
Triton impls run on a CPU only under TRITON_INTERPRET=1 and only when asked for (--impls triton / --ks_impls
triton): the interpreter's time means nothing.

--ks times Kronecker-sparse layers instead (bench_ks): for each shape, the Monarch and butterfly chains at
--rank, each distinct factor alone and the whole chain, with the Triton kernel and the bmm reference in both
layouts (bs_first: x (N, in); bs_last: x (in, N), timed without the transposes), against a dense matmul of
the same (out, in). Same columns and JSONL, with "bench": "ks" and the chain, item, pattern and layout.

--tune times every config of each Triton launch's config space (kernels.KernelConfig: tokens per program, warps,
stages) instead: forward, dX and weight grad of KronLinear at each --shape (with --ks: of each distinct factor of
the --ks_chains, default monarch, in the --layouts, default bs_first), at one token count (default 49152, a
training micro-batch), 10 launches back to back per timing, each config first checked against the default's
result (one that computes something else is never chosen, and the tune exits 1 naming it: a kernel bug). It
writes the fastest config per launch (the default unless another is more than 3% faster) and every config's time
into the launchers' table (--table, default kernel_configs.json beside kernels.py; on a CPU --table is required)
under this GPU's arch, merging with what the file holds for other archs and launches; the launchers read it back
(kernels.config_table; KERNEL_CONFIGS=path picks another file, =none none). On a CPU it runs under
TRITON_INTERPRET=1 (section "interpreter"): a test of the round trip whose timings mean nothing.
"""
import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402

SHAPES = ((768, 3072), (3072, 768))  # (in, out) of GPT-2 small's c_fc and c_proj
IMPLS = ("dense", "triton", "torch", "torch_compile", "kron_matmul")
KS_IMPLS = ("dense", "bmm", "triton")
KS_CHAINS = ("monarch", "butterfly")
LAYOUTS = ("bs_first", "bs_last")
GPU_TOKENS, GPU_KS_TOKENS, CPU_TOKENS = [49152, 393216], [25088], [256]


class Table:
    """Rows of fixed-width columns under a header printed once; the units are in the column names."""

    def __init__(self, columns):
        self.columns = columns  # [(name, width)]
        self.header_printed = False

    def row(self, *cells):
        if not self.header_printed:
            print("  ".join(f"{name:>{w}}" for name, w in self.columns))
            self.header_printed = True
        print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self.columns)))


def result_columns(on_gpu):
    """The measured columns after the ones that say what was timed."""
    cols = [("time (ms)", 10), ("x dense", 7), ("GB/s", 8), ("TFLOP/s", 8)]
    return cols + ([("% of peak GB/s", 14)] if on_gpu else []) + [("fwd rel err", 11)]


def result_cells(rec, on_gpu):
    ratio = f"{rec['ratio_vs_dense']:.2f}" if rec["ratio_vs_dense"] is not None else "-"
    cells = [f"{rec['ms']:.3f}", ratio, f"{rec['gbps']:.1f}", f"{rec['tflops']:.3f}"]
    return cells + ([f"{rec['roofline_frac']:.1%}"] if on_gpu else []) + [f"{rec['fwd_rel_err']:.1e}"]


def time_ms(fn, warmup, repeats, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def floor_bytes(n, in_f, out_f, weight_elems, pass_, elt):
    """Minimal HBM traffic: fwd reads x, writes y; bwd reads dy and x, writes dx; weights read (and grads written)."""
    if pass_ == "fwd":
        return elt * (n * (in_f + out_f) + weight_elems)
    return elt * (n * (3 * in_f + 2 * out_f) + 3 * weight_elems)


def flops(n, in_f, out_f, factors, rank, impl, pass_):
    if impl in ("dense", "kron_matmul"):
        return 2 * n * in_f * out_f * (1 if pass_ == "fwd" else 3)
    m1, k1, m2, k2 = factors
    macs = kernels.kron_macs_per_token(m1, k1, m2, k2, rank)
    if pass_ == "fwd_bwd":
        macs += kernels.kron_macs_per_token(k1, m1, k2, m2, rank)  # dX: the transposed problem
        macs += rank * 2 * m1 * k2 * (m2 + k1)  # dA via dY B, dB via A X
    return 2 * n * macs


def make_impls(names, A, B, W):
    compiled = torch.compile(kernels.kron_linear_ref) if "torch_compile" in names else None
    fns = {
        "dense": lambda x: F.linear(x, W),
        "triton": lambda x: kernels.kron_linear(x, A, B, impl="triton"),
        "torch": lambda x: kernels.kron_linear_ref(x, A, B),
        "torch_compile": lambda x: compiled(x, A, B),
        "kron_matmul": lambda x: F.linear(x, kernels.kron_dense_weight(A, B)),
    }
    return {name: fns[name] for name in names}


def device_name(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+",
                        help="default on GPU 49152 393216 (Kronecker), 25088 (--ks); on CPU 256")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("IN", "OUT"),
                        help="(in, out) to time, repeatable; default the GPT-2 MLP shapes 768 3072 and 3072 768")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all usable on the device")
    parser.add_argument("--warmup", type=int, help="default 5 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, help="default 20 on GPU, 3 on CPU")
    parser.add_argument("--peak_gbps", type=float, default=3350.0,
                        help="GPU memory bandwidth for the roofline column (H100 SXM: 3350); unused on CPU")
    parser.add_argument("--out_dir", default=str(ROOT / "records" / "kernels"))
    parser.add_argument("--ks", action="store_true", help="benchmark KS factors and chains instead")
    parser.add_argument("--ks_chains", nargs="+", choices=KS_CHAINS,
                        help="default: both (--tune: monarch, the training default)")
    parser.add_argument("--ks_impls", nargs="+", choices=KS_IMPLS, help="default: all usable on the device")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS,
                        help="default: both (--tune: bs_first, what training launches)")
    parser.add_argument("--ks_items", choices=("all", "chains"),
                        help="time each distinct factor alone too (all) or the whole chains only; default: all on "
                             "GPU, chains on CPU")
    parser.add_argument("--tune", action="store_true",
                        help="time every config of each launch's config space and write the table (see above)")
    parser.add_argument("--table", help="--tune's output (default: kernel_configs.json beside kernels.py, GPU only)")
    args = parser.parse_args(argv)
    args.shape = [tuple(s) for s in args.shape] if args.shape else list(SHAPES)
    args.ks_chains = args.ks_chains or (["monarch"] if args.tune else list(KS_CHAINS))
    args.layouts = args.layouts or (["bs_first"] if args.tune else list(LAYOUTS))

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 3)
    triton_ok = kernels.HAS_TRITON and (on_gpu or kernels.TRITON_INTERPRET)
    if args.tune:
        if not triton_ok:
            parser.error("--tune needs triton and a CUDA device (or TRITON_INTERPRET=1 on a CPU)")
        if not on_gpu and not args.table:
            parser.error("--tune on a CPU needs --table: interpreter timings do not belong in the GPU table")
        if args.tokens and len(args.tokens) != 1:
            parser.error("--tune takes one --tokens value (the table's keys do not include the token count)")
        return tune(args, device, dtype, warmup, repeats)
    out_path = Path(args.out_dir) / f"{datetime.date.today()}_{device_name(device)}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.ks:
        names = args.ks_impls or [n for n in KS_IMPLS if n != "triton" or on_gpu and triton_ok]
        if "triton" in names and not triton_ok:
            parser.error("the triton impl needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        args.tokens = args.tokens or (GPU_KS_TOKENS if on_gpu else CPU_TOKENS)
        args.ks_items = args.ks_items or ("all" if on_gpu else "chains")
        bench_ks(args, names, device, dtype, warmup, repeats, out_path)
        return out_path
    args.tokens = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    names = args.impls or [n for n in IMPLS if n not in ("triton", "torch_compile") or on_gpu and triton_ok]
    if "triton" in names and not triton_ok:
        parser.error("the triton impl needs triton and a CUDA device (or TRITON_INTERPRET=1)")

    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device={device_name(device)} dtype={dtype} rank={args.rank} impls={names} -> {out_path}")
    table = Table([("in->out", 11), ("tokens", 7), ("impl", 13), ("pass", 7)] + result_columns(on_gpu))
    for in_f, out_f in args.shape:
        layer = kernels.KronLinear(in_f, out_f, rank=args.rank).to(device=device, dtype=dtype)
        factors = layer.factors
        A, B = layer.A.detach().requires_grad_(), layer.B.detach().requires_grad_()
        W = kernels.kron_dense_weight(A, B).detach().requires_grad_()
        fns = make_impls(names, A, B, W)
        for n in args.tokens:
            x = torch.randn(n, in_f, device=device, dtype=dtype, generator=gen).requires_grad_()
            dy = torch.randn(n, out_f, device=device, dtype=dtype, generator=gen)
            y_ref = F.linear(x, W).detach().float()
            dense_ms = {}
            for name, fn in fns.items():
                params = (W,) if name == "dense" else (A, B)
                rel_err = ((fn(x).detach().float() - y_ref).norm() / y_ref.norm()).item()
                for pass_ in ("fwd", "fwd_bwd"):
                    if pass_ == "fwd":
                        def step():
                            with torch.no_grad():
                                fn(x)
                    else:
                        def step():
                            torch.autograd.grad(fn(x), (x, *params), dy)
                    ms = time_ms(step, warmup, repeats, device)
                    if name == "dense":
                        dense_ms[pass_] = ms
                    weight_elems = W.numel() if name == "dense" else A.numel() + B.numel()
                    nbytes = floor_bytes(n, in_f, out_f, weight_elems, pass_, elt)
                    gbps = nbytes / ms / 1e6
                    rec = {
                        "date": str(datetime.date.today()), "device": device_name(device), "dtype": str(dtype),
                        "impl": name, "pass": pass_, "in": in_f, "out": out_f, "factors": factors,
                        "rank": args.rank, "tokens": n, "ms": ms,
                        "ratio_vs_dense": ms / dense_ms[pass_] if pass_ in dense_ms else None,
                        "gbps": gbps, "tflops": flops(n, in_f, out_f, factors, args.rank, name, pass_) / ms / 1e9,
                        "roofline_frac": gbps / args.peak_gbps if on_gpu else None, "fwd_rel_err": rel_err,
                        "torch": torch.__version__,
                        "triton": kernels.triton.__version__ if kernels.HAS_TRITON else None,
                    }
                    table.row(f"{in_f}->{out_f}", n, name, pass_, *result_cells(rec, on_gpu))
                    with open(out_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    if not on_gpu:
        print(CPU_NOTE)
    return out_path


CPU_NOTE = "(CPU: a smoke run of the code paths; the timings say nothing about a GPU)"


def ks_items(in_f, out_f, rank, chains, factors=True):
    """(chain kind, item, patterns): every distinct factor of each chain alone (if factors), then the whole chain."""
    items = []
    for kind in chains:
        make = kernels.monarch_patterns if kind == "monarch" else kernels.butterfly_patterns
        patterns = make(out_f, in_f, rank)
        for l, p in enumerate(patterns):
            if factors and p not in patterns[:l]:
                items.append((kind, f"factor{l}", (p,)))
        items.append((kind, "chain", patterns))
    return items


def bench_ks(args, names, device, dtype, warmup, repeats, out_path):
    on_gpu = device.type == "cuda"
    tokens = args.tokens
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"KS device={device_name(device)} dtype={dtype} rank={args.rank} impls={names} layouts={args.layouts} "
          f"-> {out_path}")
    table = Table([("in->out", 11), ("tokens", 7), ("chain:item", 26), ("pattern", 14), ("impl", 6),
                   ("layout", 8), ("pass", 7)] + result_columns(on_gpu))
    for layer_in, layer_out in args.shape:
        all_items = args.ks_items == "all"
        for kind, item, patterns in ks_items(layer_in, layer_out, args.rank, args.ks_chains, all_items):
            torch.manual_seed(0)
            layer = kernels.KSLinear(patterns).to(device)
            ws = [w.detach().to(dtype).requires_grad_() for w in layer.factors]
            in_f, out_f, params = layer.in_features, layer.out_features, kernels.ks_param_count(patterns)
            W = layer.dense_weight().detach().to(dtype).requires_grad_()
            for n in tokens:
                x = torch.randn(n, in_f, device=device, dtype=dtype, generator=gen)
                dy = torch.randn(n, out_f, device=device, dtype=dtype, generator=gen)
                y_ref = F.linear(x, W).detach().float()
                dense_ms = {}
                runs = [("dense", "bs_first")] if "dense" in names else []
                runs += [(impl, lay) for impl in names if impl != "dense" for lay in args.layouts]
                for impl, layout in runs:
                    bs_last = layout == "bs_last"
                    xin = (x.t().contiguous() if bs_last else x.clone()).requires_grad_()
                    dyin = dy.t().contiguous() if bs_last else dy
                    params_t = (W,) if impl == "dense" else tuple(ws)
                    if impl == "dense":
                        def fn(x_):
                            return F.linear(x_, W)
                    else:
                        def fn(x_, impl=impl, bs_last=bs_last):
                            return kernels.ks_chain(x_, ws, patterns, impl, bs_last)
                    y = fn(xin).detach().float()
                    rel_err = (((y.t() if bs_last else y) - y_ref).norm() / y_ref.norm()).item()
                    for pass_ in ("fwd", "fwd_bwd"):
                        if pass_ == "fwd":
                            def step():
                                with torch.no_grad():
                                    fn(xin)
                        else:
                            def step():
                                torch.autograd.grad(fn(xin), (xin, *params_t), dyin)
                        ms = time_ms(step, warmup, repeats, device)
                        if impl == "dense":
                            dense_ms[pass_] = ms
                        weight_elems = in_f * out_f if impl == "dense" else params
                        gbps = floor_bytes(n, in_f, out_f, weight_elems, pass_, elt) / ms / 1e6
                        macs = in_f * out_f if impl == "dense" else params
                        rec = {
                            "date": str(datetime.date.today()), "device": device_name(device), "dtype": str(dtype),
                            "bench": "ks", "chain": kind, "item": item, "patterns": [list(p) for p in patterns],
                            "impl": impl, "layout": layout, "pass": pass_, "in": in_f, "out": out_f,
                            "rank": args.rank, "params": params, "tokens": n, "ms": ms,
                            "ratio_vs_dense": ms / dense_ms[pass_] if pass_ in dense_ms else None,
                            "gbps": gbps, "tflops": 2 * n * macs * (1 if pass_ == "fwd" else 3) / ms / 1e9,
                            "roofline_frac": gbps / args.peak_gbps if on_gpu else None, "fwd_rel_err": rel_err,
                            "torch": torch.__version__,
                            "triton": kernels.triton.__version__ if kernels.HAS_TRITON else None,
                        }
                        pattern = ",".join(map(str, patterns[0])) if item != "chain" else "-"
                        table.row(f"{in_f}->{out_f}", n, f"{kind}:{item}", pattern, impl, layout, pass_,
                                  *result_cells(rec, on_gpu))
                        with open(out_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
    if not on_gpu:
        print(CPU_NOTE)


# -----------------------------------------------------------------------------
# --tune

TUNE_MARGIN = 0.03  # another config replaces the default only when it is this much faster (timing noise)


def kron_problems(layer, x, dy):
    """[(kind, plan)] of one KronLinear's launches: plan(config) -> (KernelLaunch, outputs) where outputs() reads
    the launch's results (the weight grad's partials summed); config "default" takes the space's first entry."""
    A, B = layer.A.detach(), layer.B.detach()
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)

    def forward(c):
        y, launch = kernels._kron_apply_plan(x, A, B, config=c)
        return launch, lambda: (y,)

    def dx(c):
        y, launch = kernels._kron_apply_plan(dy, At, Bt, config=c)
        return launch, lambda: (y,)

    def weight_grad(c):
        (da, db), launch = kernels._kron_weight_grad_plan(x, dy, A, B, config=c)
        return launch, lambda: (da.sum(0), db.sum(0))

    return [("forward", forward), ("dx", dx), ("weight_grad", weight_grad)]


def ks_problems(w, pattern, x, dy, bs_last):
    """kron_problems for one KS factor (x, dy in the layout's 2-D form)."""
    a, b, c, d = pattern
    wt = w.transpose(1, 2)

    def forward(cfg):
        y, launch = kernels._ks_apply_plan(x, w, pattern, bs_last, config=cfg)
        return launch, lambda: (y,)

    def dx(cfg):
        y, launch = kernels._ks_apply_plan(dy, wt, (a, c, b, d), bs_last, config=cfg)
        return launch, lambda: (y,)

    def weight_grad(cfg):
        part, launch = kernels._ks_weight_grad_plan(x, dy, pattern, bs_last, config=cfg)
        return launch, lambda: (part.sum(0),)

    return [("forward", forward), ("dx", dx), ("weight_grad", weight_grad)]


def time_launch(launch, warmup, repeats, device, inner):
    """Median ms of one launch, timed `inner` launches back to back (so the GPU never waits on the host)."""
    def batch():
        for _ in range(inner):
            launch()
    return time_ms(batch, warmup, repeats, device) / inner


def tune_one(plan, warmup, repeats, device, tol):
    """(key, [{config, ms, status, rel_err}] per config of the launch's space): each config launched once and its
    result checked against the default's (relative Frobenius error <= tol), then timed; a config the GPU cannot
    launch (shared memory, registers) is recorded as such."""
    from triton.runtime.errors import OutOfResources
    default, outputs = plan("default")
    default()
    ref = [t.detach().float().clone() for t in outputs()]
    rows = []
    for cfg in default.space:
        launch, outputs = plan(cfg)
        try:
            launch()
        except OutOfResources as e:
            rows.append(dict(config=list(cfg), ms=None, status=f"cannot launch: {e}", rel_err=None))
            continue
        err = max(((o.float() - r).norm() / r.norm().clamp_min(1e-30)).item() for o, r in zip(outputs(), ref))
        if not err <= tol:
            rows.append(dict(config=list(cfg), ms=None, status=f"wrong result (rel err {err:.1e} > {tol})",
                             rel_err=err))
            continue
        ms = time_launch(launch, warmup, repeats, device, inner=10 if device.type == "cuda" else 1)
        rows.append(dict(config=list(cfg), ms=ms, status="ok", rel_err=err))
    return default.key, rows


def pick(rows):
    """The fastest ok row, or the default's (rows[0]) when that is within TUNE_MARGIN of it."""
    ok = [r for r in rows if r["ms"] is not None]
    best = min(ok, key=lambda r: r["ms"])
    return rows[0] if rows[0]["ms"] is not None and rows[0]["ms"] <= best["ms"] * (1 + TUNE_MARGIN) else best


def write_table(path, arch, section, entries):
    """Merge entries into path's table under arch (other archs and keys kept); returns the table."""
    path = Path(path)
    if path.exists():
        table = json.loads(path.read_text())
        kernels.load_config_table(path)  # an unusable file stops here instead of being overwritten
    else:
        table = {"format": kernels.CONFIG_TABLE_FORMAT, "archs": {}}
    old = table["archs"].get(arch, {}).get("configs", {})
    table["archs"][arch] = dict(section, configs={**old, **entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def tune(args, device, dtype, warmup, repeats):
    on_gpu = device.type == "cuda"
    n = args.tokens[0] if args.tokens else (GPU_TOKENS[0] if on_gpu else 64)
    arch = kernels.device_arch(device)
    path = Path(args.table) if args.table else kernels.CONFIG_TABLE_PATH
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    gen = torch.Generator(device=device).manual_seed(0)
    problems = []  # (what, kind, plan)
    for in_f, out_f in args.shape:
        if not args.ks:
            torch.manual_seed(0)
            layer = kernels.KronLinear(in_f, out_f, rank=args.rank).to(device)  # fp32 factors, as training's
            x = torch.randn(n, in_f, device=device, dtype=dtype, generator=gen)
            dy = torch.randn(n, out_f, device=device, dtype=dtype, generator=gen)
            problems += [(f"kron {in_f}->{out_f} {layer.factors}", kind, plan)
                         for kind, plan in kron_problems(layer, x, dy)]
            continue
        for chain, item, patterns in ks_items(in_f, out_f, args.rank, args.ks_chains):
            if item == "chain":
                continue
            pattern = patterns[0]
            torch.manual_seed(0)
            w = kernels.KSLinear([pattern]).factors[0].detach().to(device)  # fp32, as training's
            for layout in args.layouts:
                bs_last = layout == "bs_last"
                x = torch.randn(n, kernels.ks_in_features(pattern), device=device, dtype=dtype, generator=gen)
                dy = torch.randn(n, kernels.ks_out_features(pattern), device=device, dtype=dtype, generator=gen)
                if bs_last:
                    x, dy = x.t().contiguous(), dy.t().contiguous()
                problems += [(f"ks {chain} {pattern} {layout}", kind, plan)
                             for kind, plan in ks_problems(w, pattern, x, dy, bs_last)]
    print(f"tune device={device_name(device)} arch={arch} dtype={dtype} tokens={n} -> {path}")
    table = Table([("launch", 44), ("kind", 11), ("config", 32), ("ms", 9), ("x default", 9), ("", 8)])
    entries, failures, start = {}, [], time.perf_counter()
    for what, kind, plan in problems:
        key = plan("default")[0].key
        if key in entries:
            continue  # the same launch (shape, layout, dtype) met again, e.g. a repeated factor
        key, rows = tune_one(plan, warmup, repeats, device, tol)
        best = pick(rows)
        default_ms = rows[0]["ms"]
        for r in rows:
            ratio = f"{r['ms'] / default_ms:.2f}" if r["ms"] is not None and default_ms else "-"
            mark = "chosen" if r is best else "" if r["status"] == "ok" else r["status"][:40]
            table.row(what, kind, kernels.KernelConfig(*r["config"]).label(),
                      f"{r['ms']:.4f}" if r["ms"] is not None else "-", ratio, mark)
            if r["status"].startswith("wrong"):
                failures.append(f"{key} {kernels.KernelConfig(*r['config']).label()}: {r['status']}")
        block, warps, stages = best["config"]
        entries[key] = dict(block=block, num_warps=warps, num_stages=stages, ms=best["ms"], default_ms=default_ms,
                            tokens=n, timings=rows)
    section = dict(device=device_name(device), date=str(datetime.date.today()), torch=torch.__version__,
                   triton=kernels.triton.__version__, dtype=str(dtype), tokens=n,
                   seconds=round(time.perf_counter() - start, 1))
    write_table(path, arch, section, entries)
    kernels.load_config_table(path)  # what the launchers will read
    changed = sum([e["block"], e["num_warps"], e["num_stages"]] != e["timings"][0]["config"]
                  for e in entries.values())
    print(f"tune: {len(entries)} launches, {changed} take a config other than the default; {path} [{arch}]")
    if not on_gpu:
        print(CPU_NOTE)
    for line in failures:
        print(f"error: tune: {line}: a config that computes something else is a kernel bug; fix the kernel")
    if failures:
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    main()
