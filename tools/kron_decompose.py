"""Replace the dense MLP weights of a checkpoint with their nearest rank-r Kronecker factors (Van Loan).

    python tools/kron_decompose.py --checkpoint IN.pt --out OUT.pt --rank R [--factors m1 k1 m2 k2]

Every 2-D tensor named `...mlp.c_fc.weight` or `...mlp.c_proj.weight`, shape (out, in), becomes
`...mlp.c_fc.A` (r, m1, k1) and `...mlp.c_fc.B` (r, m2, k2), the KronLinear parameter names; everything
else is copied. The state dict is the checkpoint's "model" entry, or the whole file if it has none.
--factors gives (m1, k1, m2, k2) for weights of shape (m1*m2, k1*k2); a weight of the transposed shape
(c_proj next to c_fc) gets the transposed factors (k1, m1, k2, m2), since kron(A, B)^T = kron(A^T, B^T).
Without --factors, kernels.choose_kron_factors picks them per weight.

At the end it says where it wrote and prints the train_gpt.py command that starts from the result: the source
run's flags (less the bookkeeping ones: run name, records dir, checkpoint and resume flags), the --kron_mlp,
--kron_rank and --kron_factors that match the factors written, --init_from=OUT and a new --run_name.
"""
import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import choose_kron_factors, kron_dense_weight, kron_param_count, van_loan_decompose  # noqa: E402

MLP_WEIGHTS = ("mlp.c_fc.weight", "mlp.c_proj.weight")
# Flags of the source run that say where its outputs went or how it started, not what it trains: a run from the
# decomposed weights gets its own name and its own checkpoint choices.
NOT_CARRIED = ("run_name", "records_dir", "resume", "init_from", "init_partial", "save_every", "keep_checkpoints",
               "save_checkpoint")


def factors_for(shape, rank, factors=None):
    out_features, in_features = shape
    if factors is None:
        return choose_kron_factors(in_features, out_features, rank)
    m1, k1, m2, k2 = factors
    if (m1 * m2, k1 * k2) == (out_features, in_features):
        return m1, k1, m2, k2
    if (k1 * k2, m1 * m2) == (out_features, in_features):
        return k1, m1, k2, m2
    raise ValueError(f"--factors {tuple(factors)} tile neither {tuple(shape)} nor its transpose")


def decompose_state_dict(state, rank, factors=None, log=print, chosen=None):
    """The state dict with every MLP weight replaced by its factors; chosen (a dict), if given, receives
    {"fc": factors, "proj": factors} of the first c_fc / c_proj weight."""
    out = {}
    for name, value in state.items():
        if not (name.endswith(MLP_WEIGHTS) and torch.is_tensor(value) and value.dim() == 2):
            out[name] = value
            continue
        f = factors_for(value.shape, rank, factors)
        A, B = van_loan_decompose(value.float(), *f, rank=rank)
        diff, norm = (kron_dense_weight(A, B) - value.float()).norm(), value.float().norm()
        err = diff / norm if norm > 0 else diff  # a zero weight (a fresh c_proj) is reproduced exactly: 0, not nan
        prefix = name[: -len("weight")]
        out[prefix + "A"], out[prefix + "B"] = A.to(value.dtype), B.to(value.dtype)
        if chosen is not None:
            chosen.setdefault("fc" if name.endswith("c_fc.weight") else "proj", f)
        log(f"{name}: {tuple(value.shape)} factors={f} rel_frob_err={err:.4f} "
            f"params dense={value.numel()} kron={kron_param_count(*f, rank)}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--factors", type=int, nargs=4, metavar=("M1", "K1", "M2", "K2"))
    args = parser.parse_args(argv)

    if args.rank < 1:
        parser.error(f"--rank {args.rank} must be >= 1 (the number of Kronecker terms)")
    ckpt = torch.load(args.checkpoint, map_location="cpu")
    chosen = {}
    if "model" in ckpt:
        ckpt = {**ckpt, "model": decompose_state_dict(ckpt["model"], args.rank, args.factors, chosen=chosen)}
    else:
        ckpt = decompose_state_dict(ckpt, args.rank, args.factors, chosen=chosen)
    if not chosen:
        raise SystemExit(f"error: {args.checkpoint} has no 2-D weight named *{MLP_WEIGHTS[0]} or *{MLP_WEIGHTS[1]}: "
                         "decompose a dense model's checkpoint (a --kron_mlp run's already holds factors)")
    torch.save(ckpt, args.out)
    print(f"wrote {args.out}: the MLP weights as rank-{args.rank} Kronecker factors, everything else copied")
    if "args" not in ckpt:
        print("it is a bare state dict (no train_gpt.py flags), which train_gpt.py --init_from cannot read; "
              "decompose a checkpoint written by train_gpt.py (--save_checkpoint=full or weights) to train from it")
        return None
    command = next_command(ckpt["args"], chosen, args.rank, args.out)
    print(f"train from it (from the repo root; or ./run.sh with the same flags):\n  {command}")
    return command


def next_command(source_args, chosen, rank, out):
    """The train_gpt.py command line that builds the source model with these Kronecker MLPs and loads `out`."""
    import train_gpt as tg  # only here: decomposing a bare state dict needs no train_gpt.py
    preset = source_args.get("preset") or ""
    try:  # flags relative to the source's preset, so that the command reads "--preset=smoke --kron_mlp=..."
        defaults = tg.apply_overrides(tg.Hyperparameters(), [f"--preset={preset}"] if preset else [])
    except SystemExit:  # a preset this train_gpt.py no longer has: every flag spelled out
        preset, defaults = "", tg.Hyperparameters()
    flags = {"preset": preset} if preset else {}
    flags.update({k: v for k, v in source_args.items()
                  if hasattr(defaults, k) and k not in NOT_CARRIED and k != "preset" and getattr(defaults, k) != v
                  and not k.startswith("kron_")})
    which = "both" if len(chosen) == 2 else next(iter(chosen))
    flags.update(kron_mlp=which, kron_rank=rank)
    if len(chosen) == 2:  # the factors written, so the model's shapes match them whatever its default choice
        flags["kron_factors"] = ";".join(",".join(map(str, chosen[k])) for k in ("fc", "proj"))
    flags.update(init_from=out, run_name=f"{source_args.get('run_name') or 'run'}_kron_r{rank}")
    return " ".join(["python train_gpt.py", *(shlex.quote(f"--{k}={v}") for k, v in flags.items())])


if __name__ == "__main__":
    main()
