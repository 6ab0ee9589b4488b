"""Replace the dense MLP weights of a checkpoint with their nearest rank-r Kronecker factors (Van Loan).

    python tools/kron_decompose.py --checkpoint IN.pt --out OUT.pt --rank R [--factors m1 k1 m2 k2]

Every 2-D tensor named `...mlp.c_fc.weight` or `...mlp.c_proj.weight`, shape (out, in), becomes
`...mlp.c_fc.A` (r, m1, k1) and `...mlp.c_fc.B` (r, m2, k2), the KronLinear parameter names; everything
else is copied. The state dict is the checkpoint's "model" entry, or the whole file if it has none.
--factors gives (m1, k1, m2, k2) for weights of shape (m1*m2, k1*k2); a weight of the transposed shape
(c_proj next to c_fc) gets the transposed factors (k1, m1, k2, m2), since kron(A, B)^T = kron(A^T, B^T).
Without --factors, kernels.choose_kron_factors picks them per weight.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import choose_kron_factors, kron_dense_weight, kron_param_count, van_loan_decompose  # noqa: E402

MLP_WEIGHTS = ("mlp.c_fc.weight", "mlp.c_proj.weight")


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


def decompose_state_dict(state, rank, factors=None, log=print):
    out = {}
    for name, value in state.items():
        if not (name.endswith(MLP_WEIGHTS) and torch.is_tensor(value) and value.dim() == 2):
            out[name] = value
            continue
        f = factors_for(value.shape, rank, factors)
        A, B = van_loan_decompose(value.float(), *f, rank=rank)
        err = (kron_dense_weight(A, B) - value.float()).norm() / value.float().norm()
        prefix = name[: -len("weight")]
        out[prefix + "A"], out[prefix + "B"] = A.to(value.dtype), B.to(value.dtype)
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

    ckpt = torch.load(args.checkpoint, map_location="cpu")
    if "model" in ckpt:
        ckpt = {**ckpt, "model": decompose_state_dict(ckpt["model"], args.rank, args.factors)}
    else:
        ckpt = decompose_state_dict(ckpt, args.rank, args.factors)
    torch.save(ckpt, args.out)


if __name__ == "__main__":
    main()
