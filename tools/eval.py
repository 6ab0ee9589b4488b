"""Validation loss of a train_gpt.py checkpoint on any token shards.

    python tools/eval.py --checkpoint PATH [--val_files GLOB] [--val_tokens N] [--seq_len N] [--window_blocks N]
        [--device cpu|cuda]

Defaults are the checkpoint's own validation: its val_files, val_tokens and val_seq_len (capped at val_tokens), at
its final long window (model.default_window_blocks, the window the run validates with at the end). The model is
built from the checkpoint's flags and evaluated exactly as train_gpt.py's `evaluate` does: eval mode, one packed
sequence per forward, the mean of the per-sequence mean losses (all sequences have the same length). On CUDA it
mirrors training: bf16 embeddings (so bf16 activations), torch.compile when the checkpoint's `compile` flag is on.
Prints a readable line, then a machine-readable last line `eval: {...}` (JSON).
"""
import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--val_files", help="glob of .bin shards (default: the checkpoint's val_files)")
    p.add_argument("--val_tokens", type=int, help="the first N tokens of the stream (default: the checkpoint's)")
    p.add_argument("--seq_len", type=int, help="tokens per forward, a multiple of 128 dividing val_tokens "
                                               "(default: the checkpoint's val_seq_len, at most val_tokens)")
    p.add_argument("--window_blocks", type=int, help="long sliding window in 128-token blocks (short = half; "
                                                     "default: the checkpoint's final window)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_flags(opts) -> None:
    """The flags' own ranges, before anything is loaded; SystemExit with one line naming the flag."""
    if opts.val_tokens is not None and opts.val_tokens < 1:
        raise SystemExit(f"error: --val_tokens={opts.val_tokens} must be >= 1: the number of val tokens to "
                         "evaluate on (default: the checkpoint's)")
    if opts.seq_len is not None and (opts.seq_len < 1 or opts.seq_len % tg.BLOCK_SIZE):
        raise SystemExit(f"error: --seq_len={opts.seq_len} must be a positive multiple of {tg.BLOCK_SIZE} "
                         "(tokens per forward)")
    if opts.window_blocks is not None and opts.window_blocks < 1:
        raise SystemExit(f"error: --window_blocks={opts.window_blocks} must be >= 1 ({tg.BLOCK_SIZE}-token blocks)")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda: this machine has no CUDA device; use --device=cpu")


def eval_config(ckpt: dict, opts, device: torch.device) -> tg.Hyperparameters:
    args = tg.checkpoint_model_args(ckpt)  # opts passed check_flags before the checkpoint was read
    ckpt_seq_len = args.val_seq_len
    args.val_files = opts.val_files or args.val_files
    args.val_tokens = opts.val_tokens if opts.val_tokens is not None else args.val_tokens
    args.val_seq_len = opts.seq_len or min(args.val_seq_len, args.val_tokens)  # also sizes the rotary tables
    if args.val_tokens % args.val_seq_len or args.val_seq_len % tg.BLOCK_SIZE:
        if opts.seq_len:
            raise SystemExit(f"error: --seq_len={opts.seq_len} must divide --val_tokens={args.val_tokens}; pick a "
                             f"multiple of {tg.BLOCK_SIZE} that does")
        if args.val_tokens < ckpt_seq_len:
            raise SystemExit(f"error: --val_tokens={args.val_tokens} must be a multiple of {tg.BLOCK_SIZE} (below "
                             f"the checkpoint's val_seq_len {ckpt_seq_len} it is also the sequence length)")
        raise SystemExit(f"error: --val_tokens={args.val_tokens} must be a multiple of the checkpoint's val_seq_len "
                         f"{ckpt_seq_len}; change it, or pass --seq_len (a multiple of {tg.BLOCK_SIZE} dividing it)")
    if device.type != "cuda":  # same state dict, kernels this device runs
        args.kron_impl = "auto" if args.kron_impl == "triton" else args.kron_impl  # auto = torch on a CPU
        args.ks_impl = "auto" if args.ks_impl == "triton" else args.ks_impl  # auto = bmm on a CPU
    return args


def check_val_shards(args: tg.Hyperparameters, given: bool = True) -> None:
    """The val shards exist, are token shards and hold --val_tokens in whole sequences (and one target token);
    SystemExit with one line otherwise (given: --val_tokens was on the command line, not the checkpoint's). Reads
    only the headers."""
    files = sorted(Path(f) for f in glob.glob(args.val_files))
    if not files:
        raise SystemExit(f"error: no val shards match --val_files={args.val_files!r}; pass a glob of .bin token "
                         "shards (data/cached_fineweb10B.py or data/tokenize_text.py make them)")
    counts = [tg.read_shard_header(f) for f in files]  # ShardError: main() says it in one line
    usable = sum(max(n - 1, 0) // args.val_seq_len for n in counts) * args.val_seq_len
    if usable < args.val_tokens:
        whose = "" if given else " (the checkpoint's)"
        raise SystemExit(f"error: --val_tokens={args.val_tokens:,}{whose} is more than the val shards hold: "
                         f"{args.val_files!r} has {sum(counts):,} tokens in {len(files)} file(s), {usable:,} of them "
                         f"usable as {args.val_seq_len}-token sequences; lower --val_tokens")


def main(argv: list[str] | None = None) -> dict:
    opts = build_parser().parse_args(argv)
    check_flags(opts)
    device = torch.device(opts.device)
    ckpt = tg.load_checkpoint(opts.checkpoint)
    args = eval_config(ckpt, opts, device)
    try:
        check_val_shards(args, given=opts.val_tokens is not None)
        batches = tg.val_batches(args, 0, 1, device)
    except tg.ShardError as e:  # a corrupt, truncated or foreign file among the val shards
        raise SystemExit(f"error: --val_files: {e}") from None
    model = tg.build_model(args)
    model.load_state_dict(ckpt["model"])
    tg.place_model(model, args, device).eval()
    compiled = device.type == "cuda" and args.compile
    window = opts.window_blocks or model.default_window_blocks
    run = torch.compile(model, dynamic=False) if compiled else model
    t = time.perf_counter()
    window_t = torch.tensor(window, dtype=torch.int32, device=device)  # as training passes it
    with torch.no_grad():
        losses = [run(inputs, targets, window_t).item() for inputs, targets in batches]
    loss = sum(losses) / len(losses)
    result = dict(checkpoint=str(opts.checkpoint), files=args.val_files, tokens=len(batches) * args.val_seq_len,
                  seq_len=args.val_seq_len, window_blocks=window, loss=loss, ppl=math.exp(loss),
                  params=tg.count_params(model), step=ckpt.get("step"), device=str(device), compiled=compiled,
                  seconds=round(time.perf_counter() - t, 3))
    print(f"{opts.checkpoint}: val loss {loss:.4f} (ppl {result['ppl']:.2f}) on {result['tokens']:,} tokens of "
          f"{args.val_files} in {len(batches)} x {args.val_seq_len}-token sequences, window {window} blocks, "
          f"{result['params']:,} params, step {result['step']}")
    print(f"eval: {json.dumps(result)}")
    return result


if __name__ == "__main__":
    main()
