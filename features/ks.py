"""Kronecker-sparse MLPs (--ks_mlp): c_fc / c_proj become chains of block-sparse factors (kernels.KSLinear,
Monarch's two factors or a log-depth butterfly), in the blocks --ks_layers lists. Its sockets: the MLP matrices and
the per-block configuration. Cost: describe_model counts the chain's factors as matrices.
"""
import dataclasses
from dataclasses import dataclass

from kernels import KS_IMPLS, KSLinear, butterfly_patterns, monarch_patterns
from train_gpt import Hyperparameters, check_block_list, factorized_blocks


@dataclass
class Flags:
    # Kronecker-sparse MLP (features/ks.py, kernels.KSLinear): a chain of block-sparse factors (Monarch or butterfly)
    ks_mlp: str = "off"  # off | fc | proj | both: which MLP matrices become KS chains
    ks_chain: str = "monarch"  # monarch (2 factors) | butterfly (log-depth chain)
    ks_rank: int = 1  # widens the chain's inner blocks (parameters grow ~linearly in it)
    ks_impl: str = "bmm"  # bmm (reshape + batched matmul) | triton | auto (triton on CUDA)
    ks_layers: str = ""  # comma-separated blocks whose MLPs --ks_mlp factorizes ("" = all); the others stay dense


MIN_VALUES = dict(ks_rank=1)
NEEDS = dict(
    ks_chain=("--ks_mlp other than off", lambda a: a.ks_mlp != "off"),
    ks_rank=("--ks_mlp other than off", lambda a: a.ks_mlp != "off"),
    ks_impl=("--ks_mlp other than off", lambda a: a.ks_mlp != "off"),
    ks_layers=("--ks_mlp other than off", lambda a: a.ks_mlp != "off"),
)


def on(args: Hyperparameters) -> bool:
    return args.ks_mlp != "off"


def replaces_dense_mlp(args: Hyperparameters) -> str | None:
    return f"--ks_mlp={args.ks_mlp}" if on(args) else None


def check(args: Hyperparameters, fail):
    for name, valid in dict(ks_mlp=("off", "fc", "proj", "both"), ks_chain=("monarch", "butterfly"),
                            ks_impl=KS_IMPLS).items():
        if getattr(args, name) not in valid:
            fail(f"--{name}={getattr(args, name)!r}; valid values: {', '.join(valid)}")
    check_block_list(args, "ks_layers", fail)
    if not on(args):
        return
    if args.mlp_act == "swiglu":
        fail("--mlp_act=swiglu and --kron_mlp/--ks_mlp are alternatives (SwiGLU has its own merged weights)")

    def claimed(mode):
        return {"fc", "proj"} if mode == "both" else {mode} - {"off"}
    both = factorized_blocks(args.kron_layers, args.num_layers) & factorized_blocks(args.ks_layers, args.num_layers)
    if claimed(args.kron_mlp) & claimed(args.ks_mlp) and both:
        fail(f"--kron_mlp={args.kron_mlp} and --ks_mlp={args.ks_mlp} claim the same MLP matrix in blocks "
             f"{sorted(both)}; give each of fc/proj to at most one of them per block (--kron_layers/--ks_layers)")
    hidden = args.mlp_ratio * args.model_dim
    for which, out_f, in_f in (("fc", hidden, args.model_dim), ("proj", args.model_dim, hidden)):
        if args.ks_mlp in (which, "both"):
            try:
                ks_patterns(args, out_f, in_f)
            except ValueError as e:
                fail(f"--ks_mlp {which} ({in_f}->{out_f}): {e}")


def ks_patterns(args: Hyperparameters, out_features: int, in_features: int) -> list:
    build = monarch_patterns if args.ks_chain == "monarch" else butterfly_patterns
    return build(out_features, in_features, rank=args.ks_rank)


def linear(args: Hyperparameters, which: str, in_features: int, out_features: int, zero_init: bool):
    """c_fc / c_proj as a KSLinear where --ks_mlp asks for it; zero_init zeroes the last factor only, so the chain
    still learns."""
    if args.ks_mlp not in (which, "both"):
        return None
    return KSLinear(ks_patterns(args, out_features, in_features), impl=args.ks_impl, zero_init_last=zero_init)


def mlp_args(args: Hyperparameters, layer: int) -> Hyperparameters:
    """--ks_mlp off in the blocks --ks_layers leaves out."""
    if on(args) and layer not in factorized_blocks(args.ks_layers, args.num_layers):
        return dataclasses.replace(args, ks_mlp="off")
    return args
