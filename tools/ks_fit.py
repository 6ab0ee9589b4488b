"""Fit a Kronecker-sparse (KS) chain to a dense weight matrix W (out, in) by regression on random inputs.

    python tools/ks_fit.py --weight_path ckpt.pt --key blocks.0.mlp.c_fc.weight --rank 4
    python tools/ks_fit.py --weight_path W.pt --patterns "1,48,32,24;48,64,24,1" --num_epochs 50

The file holds a bare tensor, a state dict (pass --key), or a training checkpoint whose "model" entry is a
state dict (pass --key, the parameter name). Inputs x ~ N(0, I), targets x @ W^T, loss MSE; the chain is
kernels.butterfly_patterns(out, in, rank) unless --patterns gives one. Writes to --output_dir:
{prefix}_best.pth (lowest val loss), {prefix}_final.pth, {prefix}_epoch_{N}.pth every --save_interval
epochs, and {prefix}_training_log.json. Every checkpoint holds the model, optimizer and scheduler state,
train/val loss, grad norm (None unless --log_grad_norm), lr, patterns, impl, bs_last and the compression
statistics (params, ratio, bytes saved at W's dtype, relative error ||W_ks - W||_F / ||W||_F with W_ks the
chain applied to the identity). A fitted chain in three lines, from the repository root:

    from kernels import load_ks_chain
    chain = load_ks_chain("trained_models/ks_chain_best.pth")
    y = chain(x)  # x (..., in_features); y ~= x @ W.T
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from kernels import KSLinear, butterfly_patterns, check_ks_chain, ks_in_features, ks_out_features  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def compression_stats(weight, chain):
    """Parameter and byte counts (both at W's dtype) and the relative Frobenius error of the chain."""
    dense, ks = weight.numel(), sum(p.numel() for p in chain.parameters())
    elt = weight.element_size()
    with torch.no_grad():
        w = weight.to(device=chain.factors[0].device, dtype=torch.float32)
        rel = ((chain.dense_weight().float() - w).norm() / w.norm()).item()
    return {"dense_params": dense, "ks_params": ks, "compression_ratio": dense / ks,
            "dense_bytes": dense * elt, "ks_bytes": ks * elt, "memory_saved_bytes": (dense - ks) * elt,
            "relative_error": rel}


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
def eval_loss(chain, x, y, dtype, batch=4096):
    total = 0.0
    for i in range(0, len(x), batch):
        total += F.mse_loss(chain(x[i:i + batch].to(dtype)).float(), y[i:i + batch], reduction="sum").item()
    return total / y.numel()


def fit(args, log=print):
    """Train, save, and return the final summary. Raises ValueError on bad input."""
    if not 0 < args.val_split < 1:
        raise ValueError(f"--val_split must be in (0, 1), got {args.val_split}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.impl == "triton":
        try:
            kernels._check_ks_triton_usable(torch.empty(0, device=device))
        except RuntimeError as e:
            raise ValueError(f"--impl triton: {e}") from None

    weight = load_weight(args.weight_path, args.key)
    patterns = chain_patterns(tuple(weight.shape), args.rank, args.patterns)
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

    chain = KSLinear(patterns, impl=args.impl, bs_last=args.bs_last).to(device)
    opt = make_optimizer(args, chain.parameters())
    sched = make_scheduler(args, opt)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / args.save_prefix
    log(f"weight {tuple(weight.shape)} {weight.dtype} -> KS chain {patterns} ({args.impl}, "
        f"{'bs_last' if args.bs_last else 'bs_first'}, {dtype}, {device})")

    def checkpoint(epoch, train_loss, val_loss, grad_norm):
        return {"epoch": epoch, "model_state_dict": chain.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": sched.state_dict() if sched is not None else None,
                "train_loss": train_loss, "val_loss": val_loss, "grad_norm": grad_norm,
                "lr": opt.param_groups[0]["lr"], "patterns": [list(p) for p in patterns], "impl": args.impl,
                "bs_last": args.bs_last, "weight_shape": list(weight.shape),
                "compression": compression_stats(weight, chain), "args": vars(args)}

    history, best_val, best_epoch, step = [], math.inf, None, 0
    t0 = time.perf_counter()
    n_train = len(x_tr)
    for epoch in range(1, args.num_epochs + 1):
        chain.train()
        perm = torch.randperm(n_train, generator=gen).to(device)
        loss_sum, norm_sum, n_batches = 0.0, 0.0, 0
        for i in range(0, n_train, args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.mse_loss(chain(x_tr[idx].to(dtype)).float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(chain.parameters(), args.max_grad_norm)
            elif args.log_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(chain.parameters(), math.inf)  # measures only
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
        chain.eval()
        val_loss = eval_loss(chain, x_va, y_va, dtype)
        lr = opt.param_groups[0]["lr"]
        if args.scheduler == "plateau":
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                        "grad_norm": grad_norm, "time_s": time.perf_counter() - t0})
        if args.verbose or epoch % args.save_interval == 0 or epoch == args.num_epochs:
            log(f"epoch {epoch} train {train_loss:.3e} val {val_loss:.3e} lr {lr:.2e}"
                + (f" grad_norm {grad_norm:.3e}" if grad_norm is not None else ""))
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            torch.save(checkpoint(epoch, train_loss, val_loss, grad_norm), f"{prefix}_best.pth")
        if epoch % args.save_interval == 0:
            torch.save(checkpoint(epoch, train_loss, val_loss, grad_norm), f"{prefix}_epoch_{epoch}.pth")

    final = checkpoint(args.num_epochs, train_loss, val_loss, grad_norm)
    torch.save(final, f"{prefix}_final.pth")
    best_stats = torch.load(f"{prefix}_best.pth", map_location="cpu", weights_only=True)["compression"]
    stats = final["compression"]
    summary = {"args": vars(args), "weight_shape": list(weight.shape), "patterns": [list(p) for p in patterns],
               "impl": args.impl, "bs_last": args.bs_last, "dtype": str(dtype), "device": str(device),
               "epochs": history, "best_epoch": best_epoch, "best_val_loss": best_val,
               "final_val_loss": val_loss, "compression": stats, "best_relative_error": best_stats["relative_error"]}
    with open(f"{prefix}_training_log.json", "w") as f:
        json.dump(summary, f, indent=1)

    log(f"dense params {stats['dense_params']:,}  KS params {stats['ks_params']:,}  "
        f"compression {stats['compression_ratio']:.2f}x  memory saved {stats['memory_saved_bytes'] / 2**20:.3f} MiB "
        f"({weight.dtype})")
    log(f"relative error ||W_ks - W||_F / ||W||_F: final {stats['relative_error']:.3e}, "
        f"best (epoch {best_epoch}) {best_stats['relative_error']:.3e}")
    return summary


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weight_path", required=True, help=".pt/.pth: a tensor, a state dict, or a checkpoint")
    p.add_argument("--key", help="state dict key (parameter name for a checkpoint's 'model')")
    p.add_argument("--rank", type=int, default=4, help="butterfly chain rank (ignored with --patterns)")
    p.add_argument("--patterns", help="explicit chain 'a,b,c,d;a,b,c,d', first applied first")
    p.add_argument("--bs_last", action="store_true", help="run the chain batch-size-last")
    p.add_argument("--impl", choices=("triton", "bmm"), default="bmm")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_epochs", type=int, default=100)
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
    p.add_argument("--save_interval", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="compute dtype (default float32 on CPU, bfloat16 on "
                   "CUDA); the chain's parameters stay fp32")
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
