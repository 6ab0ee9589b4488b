"""Fit a Kronecker-sparse (KS) chain to a dense weight matrix W (out, in) by regression on random inputs.

    python tools/ks_fit.py --weight_path ckpt.pt --key blocks.0.mlp.c_fc.weight --rank 4
    python tools/ks_fit.py --weight_path W.pt --patterns "1,48,32,24;48,64,24,1" --num_epochs 50
    python tools/ks_fit.py --weight_path W.pt --rank_mode adapter --rank 8
    python tools/ks_fit.py --count_only --shape 3072 768 --rank 4

The file holds a bare tensor, a state dict (pass --key), or a training checkpoint whose "model" entry is a
state dict (pass --key, the parameter name). Inputs x ~ N(0, I), targets x @ W^T, loss MSE.

What --rank means depends on --rank_mode:
  blocks   (default) the chain is kernels.butterfly_patterns(out, in, rank): the rank widens alternate interfaces
           of the butterfly (its blocks grow), params ~ rank. --patterns replaces the chain (and --rank is unused).
  adapter  W ~ butterfly + U V^T: the rank-1 butterfly chain (or --patterns) plus a rank-`rank` term with U (out, r)
           and V (in, r), params = chain + r * (out + in). U V^T starts at W's truncated SVD (the best rank-r term
           alone) and the chain's last factor at zero, so the fit starts from the best low-rank approximation.
--count_only prints the parameter counts of both modes at --rank (for the weight's shape, or --shape OUT IN) and
fits nothing.

Writes to --output_dir: {prefix}_best.pth (lowest val loss), {prefix}_final.pth, {prefix}_epoch_{N}.pth every
--save_interval epochs (0 = none), {prefix}_training_log.json, and the per-epoch loss curves
{prefix}_rank_{r}_loss_curves.json and .csv ({prefix}_loss_curves.* when explicit --patterns leave no rank). Every
checkpoint holds the model, optimizer and scheduler state, train/val loss, grad norm (None unless
--log_grad_norm), lr, patterns, impl, bs_last, rank_mode, adapter_rank, and compression_stats (params, ratio,
bytes saved at W's dtype, relative error ||W_fit - W||_F / ||W||_F with W_fit the fitted map applied to the
identity). Checkpoints written before the field was renamed call it "compression"; stats_of() reads both. A fitted
chain in three lines, from the repository root:

    from kernels import load_ks_chain
    chain = load_ks_chain("trained_models/ks_chain_best.pth")
    y = chain(x)  # x (..., in_features); y ~= x @ W.T

An adapter fit (chain + U V^T) loads with load_fitted("trained_models/ks_chain_best.pth") from this file.
"""
import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from kernels import (KSLinear, butterfly_patterns, check_ks_chain, ks_in_features, ks_out_features,  # noqa: E402
                     ks_param_count)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RANK_MODES = ("blocks", "adapter")
DEFAULT_RANK = 4


def parse_patterns(text):
    """"a,b,c,d;a,b,c,d" -> ((a, b, c, d), ...), validated as a chain."""
    try:
        patterns = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        raise ValueError(f"--patterns must look like 'a,b,c,d;a,b,c,d' (integers), got {text!r}") from None
    return check_ks_chain(patterns)


def _describe(state):
    return ", ".join(f"{k} {tuple(v.shape)}" if torch.is_tensor(v) else f"{k} ({type(v).__name__})"
                     for k, v in state.items())


def load_weight(path, key=None):
    """The tensor at `key` of a bare-tensor file, a state dict, or a checkpoint with a "model" state dict."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(obj):
        if key is not None:
            raise ValueError(f"{path} holds a bare tensor of shape {tuple(obj.shape)}; drop --key {key!r}")
        weight = obj
    elif isinstance(obj, dict):
        state, where = obj, "the state dict"
        if isinstance(obj.get("model"), dict):
            state, where = obj["model"], "the checkpoint's 'model' state dict"
        if key is None:
            raise ValueError(f"{path} holds a dict; pass --key, one of: {_describe(state)}")
        if key not in state:
            raise ValueError(f"key {key!r} not in {where} of {path}; available keys: {_describe(state)}")
        weight = state[key]
        if not torch.is_tensor(weight):
            raise ValueError(f"{key!r} in {path} is a {type(weight).__name__}, not a tensor")
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor, a state dict, or a checkpoint "
                         "dict with a 'model' state dict")
    if weight.dim() != 2:
        hint = ""
        if isinstance(obj, dict):
            matrices = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 2}
            hint = f"; 2-D keys: {_describe(matrices) or 'none'}"
        raise ValueError(f"the weight must be a 2-D (out_features, in_features) matrix, got shape "
                         f"{tuple(weight.shape)}{hint}")
    return weight


def chain_patterns(shape, rank, patterns_text=None):
    out_features, in_features = shape
    if patterns_text is None:
        return butterfly_patterns(out_features, in_features, rank)
    patterns = parse_patterns(patterns_text)
    got = (ks_out_features(patterns[-1]), ks_in_features(patterns[0]))
    if got != (out_features, in_features):
        raise ValueError(f"--patterns map {got[1]} -> {got[0]} features but the weight is (out, in)={tuple(shape)}")
    return patterns


# -----------------------------------------------------------------------------
# The two meanings of rank


class ButterflyLowRank(nn.Module):
    """W = W_chain + U V^T (--rank_mode adapter): a KS chain plus a rank-r term, U (out, r), V (in, r).
    forward(x) = chain(x) + (x V) U^T, two thin matmuls beside the chain, never the dense (out, in) product."""

    def __init__(self, patterns, rank, impl="bmm", bs_last=False):
        super().__init__()
        # The last factor starts at zero so that, with U V^T from init_low_rank, the fit starts at the best
        # rank-r approximation; the zero factor still gets a gradient (its input is the chain's non-zero prefix).
        self.chain = KSLinear(patterns, impl=impl, bs_last=bs_last, zero_init_last=True)
        self.in_features, self.out_features, self.rank = self.chain.in_features, self.chain.out_features, rank
        self.U = nn.Parameter(torch.zeros(self.out_features, rank))
        self.V = nn.Parameter(torch.zeros(self.in_features, rank))

    @torch.no_grad()
    def init_low_rank(self, weight):
        """U V^T = the rank-r truncated SVD of weight, sqrt of each singular value on either side."""
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        root = s[:self.rank].sqrt()
        self.U.copy_(u[:, :self.rank] * root)
        self.V.copy_(vh[:self.rank].T * root)

    def forward(self, x):
        low_rank = F.linear(F.linear(x, self.V.t().to(x.dtype)), self.U.to(x.dtype))
        return self.chain(x) + low_rank

    def dense_weight(self):
        return self.chain.dense_weight() + self.U @ self.V.T

    def extra_repr(self):
        return f"rank={self.rank}"


def fit_layout(shape, rank, rank_mode, patterns_text=None):
    """(patterns, adapter_rank) for a fit of an (out, in) matrix; adapter_rank is 0 in blocks mode. rank may be
    None only for blocks with explicit patterns. ValueError when the layout is impossible or has no fewer
    parameters than the dense matrix."""
    if rank_mode not in RANK_MODES:
        raise ValueError(f"--rank_mode must be one of {', '.join(RANK_MODES)}, got {rank_mode!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    if rank_mode == "blocks":
        return chain_patterns(shape, rank, patterns_text), 0
    patterns = chain_patterns(shape, 1, patterns_text)
    out_features, in_features = shape
    chain, dense = ks_param_count(patterns), out_features * in_features
    if chain + rank * (out_features + in_features) >= dense:
        room = (dense - chain - 1) // (out_features + in_features)
        hint = f"use --rank <= {room}" if room >= 1 else "no adapter rank compresses it"
        raise ValueError(f"--rank_mode adapter --rank {rank} for {tuple(shape)} has {chain} chain + "
                         f"{rank * (out_features + in_features)} adapter parameters, not fewer than the dense "
                         f"{dense}: {hint}")
    return patterns, rank


def build_fit_module(patterns, adapter_rank, impl="bmm", bs_last=False):
    if adapter_rank:
        return ButterflyLowRank(patterns, adapter_rank, impl=impl, bs_last=bs_last)
    return KSLinear(patterns, impl=impl, bs_last=bs_last)


def param_counts(shape, rank, patterns_text=None):
    """Parameters of both rank modes at `rank` for an (out, in) matrix: {"dense": n, "blocks": {...} or
    {"error": msg}, "adapter": {...} or {"error": msg}}; each mode's dict has chain, adapter, total, ratio."""
    dense = shape[0] * shape[1]
    counts = {"shape": list(shape), "rank": rank, "dense": dense}
    for mode in RANK_MODES:
        try:
            patterns, adapter_rank = fit_layout(shape, rank, mode, patterns_text)
        except ValueError as e:
            counts[mode] = {"error": str(e)}
            continue
        chain, adapter = ks_param_count(patterns), adapter_rank * (shape[0] + shape[1])
        counts[mode] = {"chain": chain, "adapter": adapter, "total": chain + adapter,
                        "ratio": dense / (chain + adapter), "patterns": [list(p) for p in patterns]}
    return counts


def print_counts(counts, log=print):
    log(f"{counts['shape'][0]}x{counts['shape'][1]}: dense {counts['dense']:,} params; rank {counts['rank']}:")
    for mode in RANK_MODES:
        c = counts[mode]
        if "error" in c:
            log(f"  {mode:8s} not available: {c['error']}")
        else:
            what = ("butterfly chain" if mode == "blocks" else
                    f"rank-1 butterfly {c['chain']:,} + U V^T {c['adapter']:,} =")
            log(f"  {mode:8s} {what} {c['total']:,} params ({c['ratio']:.1f}x fewer), "
                f"{len(c['patterns'])} factors")


# -----------------------------------------------------------------------------
# Statistics and checkpoints


def compression_stats(weight, model):
    """Parameter and byte counts (both at W's dtype) and the relative Frobenius error of the fitted map."""
    chain = model.chain if isinstance(model, ButterflyLowRank) else model
    dense, ks = weight.numel(), sum(p.numel() for p in chain.parameters())
    fitted = sum(p.numel() for p in model.parameters())
    elt = weight.element_size()
    with torch.no_grad():
        w = weight.to(device=chain.factors[0].device, dtype=torch.float32)
        rel = ((model.dense_weight().float() - w).norm() / w.norm()).item()
    return {"dense_params": dense, "ks_params": ks, "adapter_params": fitted - ks, "fitted_params": fitted,
            "compression_ratio": dense / fitted, "dense_bytes": dense * elt, "fitted_bytes": fitted * elt,
            "memory_saved_bytes": (dense - fitted) * elt, "relative_error": rel}


def stats_of(ckpt):
    """The compression statistics of a ks_fit checkpoint, new ("compression_stats") or old ("compression") key."""
    for key in ("compression_stats", "compression"):
        if key in ckpt:
            return ckpt[key]
    raise ValueError(f"not a ks_fit checkpoint: no compression_stats (or old compression) entry; keys {sorted(ckpt)}")


def load_fitted(path, impl=None, map_location="cpu"):
    """The fitted module of a ks_fit checkpoint: a KSLinear (rank_mode blocks, and checkpoints older than
    rank_mode) or a ButterflyLowRank (adapter). impl overrides the saved one (e.g. "bmm" on a CPU)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "patterns" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path} is not a ks_fit checkpoint: it needs patterns and model_state_dict; found keys "
                         f"{sorted(ckpt)}")
    model = build_fit_module([tuple(p) for p in ckpt["patterns"]], ckpt.get("adapter_rank", 0),
                             impl or ckpt.get("impl", "bmm"), bool(ckpt.get("bs_last", False)))
    model.load_state_dict(ckpt["model_state_dict"])
    return model


def write_loss_curves(stem, history, meta):
    """{stem}.json: columns (epoch, train_loss, ...) as lists plus meta; {stem}.csv: one row per epoch."""
    columns = list(history[0])
    with open(f"{stem}.json", "w") as f:
        json.dump({**meta, **{c: [row[c] for row in history] for c in columns}}, f, indent=1)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


# -----------------------------------------------------------------------------
# Fitting


def make_optimizer(args, params):
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def make_scheduler(args, opt):
    """Stepped once per epoch; plateau watches the val loss."""
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=args.scheduler_factor,
                                                          patience=args.scheduler_patience)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.num_epochs)
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=args.step_size, gamma=args.gamma)
    return None


@torch.no_grad()
def eval_loss(model, x, y, dtype, batch=4096):
    total = 0.0
    for i in range(0, len(x), batch):
        total += F.mse_loss(model(x[i:i + batch].to(dtype)).float(), y[i:i + batch], reduction="sum").item()
    return total / y.numel()


def check_args(args):
    """Ranges argparse cannot express, each with the fix."""
    if args.count_only:
        if args.weight_path is None and args.shape is None:
            raise ValueError("--count_only needs the matrix shape: --shape OUT IN, or --weight_path (and --key)")
        return
    if args.weight_path is None:
        raise ValueError("--weight_path is required (a tensor, state dict or checkpoint file); to print parameter "
                         "counts without a weight use --count_only --shape OUT IN")
    if args.shape is not None:
        raise ValueError("--shape is for --count_only; a fit takes the shape of --weight_path")
    if args.num_epochs < 1:
        raise ValueError(f"--num_epochs must be >= 1 (a fit with no epochs has nothing to save), got "
                         f"{args.num_epochs}; --count_only prints the parameter counts without fitting")
    if args.save_interval < 0:
        raise ValueError(f"--save_interval must be >= 0 (0 = no periodic {args.save_prefix}_epoch_N.pth "
                         f"checkpoints), got {args.save_interval}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0 < args.val_split < 1:
        raise ValueError(f"--val_split must be in (0, 1), got {args.val_split}")


def count_only(args, log=print):
    shape = tuple(args.shape) if args.shape is not None else tuple(load_weight(args.weight_path, args.key).shape)
    counts = param_counts(shape, args.rank, args.patterns)
    print_counts(counts, log)
    return counts


def fit(args, log=print):
    """Train, save, and return the final summary (with --count_only: the parameter counts). Raises ValueError
    on bad input."""
    if args.rank is None and (args.patterns is None or args.rank_mode == "adapter" or args.count_only):
        args.rank = DEFAULT_RANK  # None stays only where explicit patterns fix the whole chain
    elif args.rank is not None and args.patterns is not None and args.rank_mode == "blocks" and not args.count_only:
        raise ValueError("--rank has no effect with --patterns in --rank_mode blocks (the patterns fix the chain); "
                         "drop --rank, or pass --rank_mode adapter to add a rank-r U V^T term to the patterns")
    check_args(args)
    if args.count_only:
        return count_only(args, log)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.impl == "triton":
        try:
            kernels._check_ks_triton_usable(torch.empty(0, device=device))
        except RuntimeError as e:
            raise ValueError(f"--impl triton: {e}") from None

    weight = load_weight(args.weight_path, args.key)
    patterns, adapter_rank = fit_layout(tuple(weight.shape), args.rank, args.rank_mode, args.patterns)
    out_features, in_features = weight.shape
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    w32 = weight.float()
    x_all = torch.randn(args.num_samples, in_features, generator=gen)
    y_all = x_all @ w32.T
    n_val = max(1, round(args.num_samples * args.val_split))
    if n_val >= args.num_samples:
        raise ValueError(f"--num_samples {args.num_samples} leaves no training samples at --val_split {args.val_split}")
    x_tr, y_tr = x_all[n_val:].to(device), y_all[n_val:].to(device)
    x_va, y_va = x_all[:n_val].to(device), y_all[:n_val].to(device)

    model = build_fit_module(patterns, adapter_rank, impl=args.impl, bs_last=args.bs_last)
    if adapter_rank:
        model.init_low_rank(w32)
    model.to(device)
    opt = make_optimizer(args, model.parameters())
    sched = make_scheduler(args, opt)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / args.save_prefix
    log(f"weight {tuple(weight.shape)} {weight.dtype} -> KS chain {patterns}"
        + (f" + rank-{adapter_rank} U V^T" if adapter_rank else "")
        + f" ({args.impl}, {'bs_last' if args.bs_last else 'bs_first'}, {dtype}, {device})")
    if adapter_rank:
        log(f"start (truncated SVD adapter, zero chain): relative error "
            f"{compression_stats(weight, model)['relative_error']:.3e}")

    def checkpoint(epoch, train_loss, val_loss, grad_norm):
        return {"epoch": epoch, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": sched.state_dict() if sched is not None else None,
                "train_loss": train_loss, "val_loss": val_loss, "grad_norm": grad_norm,
                "lr": opt.param_groups[0]["lr"], "patterns": [list(p) for p in patterns], "impl": args.impl,
                "bs_last": args.bs_last, "rank_mode": args.rank_mode, "adapter_rank": adapter_rank,
                "weight_shape": list(weight.shape), "compression_stats": compression_stats(weight, model),
                "args": vars(args)}

    history, best_val, best_epoch, step = [], math.inf, None, 0
    t0 = time.perf_counter()
    n_train = len(x_tr)
    for epoch in range(1, args.num_epochs + 1):
        model.train()
        perm = torch.randperm(n_train, generator=gen).to(device)
        loss_sum, norm_sum, n_batches = 0.0, 0.0, 0
        for i in range(0, n_train, args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.mse_loss(model(x_tr[idx].to(dtype)).float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            elif args.log_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # measures only
            opt.step()
            step += 1
            loss_sum += loss.item()
            n_batches += 1
            if args.log_grad_norm:
                norm_sum += norm.item()
            if args.verbose and step % args.log_interval == 0:
                log(f"  step {step} loss {loss.item():.3e}" + (f" grad_norm {norm.item():.3e}"
                                                               if args.log_grad_norm else ""))
        train_loss = loss_sum / n_batches
        grad_norm = norm_sum / n_batches if args.log_grad_norm else None
        model.eval()
        val_loss = eval_loss(model, x_va, y_va, dtype)
        lr = opt.param_groups[0]["lr"]
        if args.scheduler == "plateau":
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                        "grad_norm": grad_norm, "time_s": time.perf_counter() - t0})
        periodic = args.save_interval > 0 and epoch % args.save_interval == 0
        if args.verbose or periodic or epoch == args.num_epochs:
            log(f"epoch {epoch} train {train_loss:.3e} val {val_loss:.3e} lr {lr:.2e}"
                + (f" grad_norm {grad_norm:.3e}" if grad_norm is not None else ""))
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            torch.save(checkpoint(epoch, train_loss, val_loss, grad_norm), f"{prefix}_best.pth")
        if periodic:
            torch.save(checkpoint(epoch, train_loss, val_loss, grad_norm), f"{prefix}_epoch_{epoch}.pth")

    final = checkpoint(args.num_epochs, train_loss, val_loss, grad_norm)
    torch.save(final, f"{prefix}_final.pth")
    best_stats = stats_of(torch.load(f"{prefix}_best.pth", map_location="cpu", weights_only=True))
    stats = final["compression_stats"]
    summary = {"args": vars(args), "weight_shape": list(weight.shape), "patterns": [list(p) for p in patterns],
               "impl": args.impl, "bs_last": args.bs_last, "rank_mode": args.rank_mode, "adapter_rank": adapter_rank,
               "dtype": str(dtype), "device": str(device), "epochs": history, "best_epoch": best_epoch,
               "best_val_loss": best_val, "final_val_loss": val_loss, "compression_stats": stats,
               "best_relative_error": best_stats["relative_error"]}
    with open(f"{prefix}_training_log.json", "w") as f:
        json.dump(summary, f, indent=1)
    curves = f"{prefix}_loss_curves" if args.rank is None else f"{prefix}_rank_{args.rank}_loss_curves"
    write_loss_curves(curves, history, {"rank": args.rank, "rank_mode": args.rank_mode,
                                        "weight_shape": list(weight.shape), "fitted_params": stats["fitted_params"]})
    summary["loss_curves"] = [f"{curves}.json", f"{curves}.csv"]

    log(f"dense params {stats['dense_params']:,}  KS params {stats['ks_params']:,}"
        + (f" + adapter params {stats['adapter_params']:,}" if adapter_rank else "")
        + f"  compression {stats['compression_ratio']:.2f}x  memory saved "
        f"{stats['memory_saved_bytes'] / 2**20:.3f} MiB ({weight.dtype})")
    log(f"relative error ||W_fit - W||_F / ||W||_F: final {stats['relative_error']:.3e}, "
        f"best (epoch {best_epoch}) {best_stats['relative_error']:.3e}")
    log(f"loss curves: {curves}.json, {curves}.csv")
    return summary


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weight_path", help=".pt/.pth: a tensor, a state dict, or a checkpoint (required unless "
                                         "--count_only --shape)")
    p.add_argument("--key", help="state dict key (parameter name for a checkpoint's 'model')")
    p.add_argument("--rank", type=int, help=f"blocks: butterfly chain rank (default {DEFAULT_RANK}; not with "
                                            f"--patterns); adapter: rank of U V^T (default {DEFAULT_RANK})")
    p.add_argument("--rank_mode", choices=RANK_MODES, default="blocks",
                   help="blocks: rank widens the butterfly's blocks; adapter: rank-1 butterfly + rank-r U V^T")
    p.add_argument("--patterns", help="explicit chain 'a,b,c,d;a,b,c,d', first applied first")
    p.add_argument("--count_only", action="store_true", help="print both rank modes' parameter counts and exit")
    p.add_argument("--shape", type=int, nargs=2, metavar=("OUT", "IN"), help="--count_only without a weight file")
    p.add_argument("--bs_last", action="store_true", help="run the chain batch-size-last")
    p.add_argument("--impl", choices=("triton", "bmm"), default="bmm")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_epochs", type=int, default=100, help=">= 1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=("adam", "sgd", "adamw"), default="adamw", help="sgd uses momentum 0.9")
    p.add_argument("--scheduler", choices=("plateau", "cosine", "step", "none"), default="plateau")
    p.add_argument("--scheduler_patience", type=int, default=10)
    p.add_argument("--scheduler_factor", type=float, default=0.5)
    p.add_argument("--step_size", type=int, default=30)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="<= 0 disables clipping")
    p.add_argument("--log_grad_norm", action="store_true")
    p.add_argument("--num_samples", type=int, default=10000)
    p.add_argument("--val_split", type=float, default=0.2)
    p.add_argument("--output_dir", default="./trained_models")
    p.add_argument("--save_prefix", default="ks_chain")
    p.add_argument("--save_interval", type=int, default=10, help="epochs between {prefix}_epoch_N.pth (0 = never)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="compute dtype (default float32 on CPU, bfloat16 on "
                   "CUDA); the fitted parameters stay fp32")
    p.add_argument("--log_interval", type=int, default=100, help="steps between loss lines with --verbose")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return fit(args)
    except ValueError as e:  # bad input: a usage error naming the valid options
        parser.error(str(e))


if __name__ == "__main__":
    main()
