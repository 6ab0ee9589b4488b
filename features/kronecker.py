"""Kronecker-factorized MLPs (--kron_mlp): c_fc / c_proj become sums of Kronecker products W = sum_i A_i (x) B_i
(kernels.KronLinear, never materialized), in the blocks --kron_layers lists; with --moe_experts every expert's
matrices (KronMoE, GroupedKronLinear); with --kron_progressive_every the blocks turn Kronecker one by one during
training (ProgressiveReplacement, from the Van Loan nearest Kronecker sum of the dense MLP). Its sockets: the MLP
matrices, the block MLP (Kronecker experts), per-block and per-step configurations, the Adam group "kron"
(--kron_optimizer=adam), a step hook, a record line. Cost: describe_model counts the factored contraction's FLOPs.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from features.moe import MoE, moe_expert_hidden
from kernels import IMPLS, KronLinear, choose_kron_factors, kron_factor_init_, kron_macs_per_token
from kernels import _a_first as kron_contracts_k1_first
from kernels import van_loan_decompose
from train_gpt import (DistEnv, GPT, Hyperparameters, build_mlp, build_optimizers, check_block_list, count_params,
                       factorized_blocks, total_steps)

REQUIRES = ("moe",)  # KronMoE is an MoE whose experts are Kronecker sums


@dataclass
class Flags:
    # Kronecker-factorized MLP (features/kronecker.py, kernels.KronLinear): W = sum_{i<r} A_i (x) B_i, never built
    kron_mlp: str = "off"  # off | fc | proj | both: which MLP matrices become Kronecker sums
    kron_rank: int = 1  # r, the number of Kronecker terms
    kron_factors: str = ""  # "m1,k1,m2,k2;m1,k1,m2,k2" for c_fc;c_proj ("" = balanced shapes, cheapest order)
    kron_impl: str = "auto"  # auto (triton on CUDA, torch elsewhere) | triton | torch | dense (debugging)
    kron_optimizer: str = "adam"  # adam | muon: which optimizer trains the factors (devlog 2026-11-23)
    kron_adam_lr: float = 0.008  # Adam LR for the factors when kron_optimizer=adam
    kron_progressive_every: int = 0  # start dense; every N steps the next --kron_layers block becomes Kronecker
    kron_progressive_distill_steps: int = 0  # Adam steps fitting each new student to its dense MLP on live inputs
    kron_layers: str = ""  # comma-separated blocks whose MLPs --kron_mlp factorizes ("" = all); the others stay dense


MIN_VALUES = dict(kron_rank=1, kron_adam_lr=0.0, kron_progressive_every=0, kron_progressive_distill_steps=0)
NEEDS = dict(
    kron_rank=("--kron_mlp other than off", lambda a: a.kron_mlp != "off"),
    kron_factors=("--kron_mlp other than off", lambda a: a.kron_mlp != "off"),
    kron_impl=("--kron_mlp other than off", lambda a: a.kron_mlp != "off"),
    kron_optimizer=("--kron_mlp other than off", lambda a: a.kron_mlp != "off"),
    kron_adam_lr=("--kron_mlp and --kron_optimizer=adam", lambda a: a.kron_mlp != "off" and
                  a.kron_optimizer == "adam"),
    kron_layers=("--kron_mlp other than off", lambda a: a.kron_mlp != "off"),
    kron_progressive_distill_steps=("--kron_progressive_every > 0", lambda a: a.kron_progressive_every > 0),
)
ADAM_GROUPS = ("kron",)


def on(args: Hyperparameters) -> bool:
    return args.kron_mlp != "off"


def replaces_dense_mlp(args: Hyperparameters) -> str | None:
    return f"--kron_mlp={args.kron_mlp}" if on(args) else None


def check(args: Hyperparameters, fail):
    for name, valid in dict(kron_mlp=("off", "fc", "proj", "both"), kron_impl=IMPLS,
                            kron_optimizer=("adam", "muon")).items():
        if getattr(args, name) not in valid:
            fail(f"--{name}={getattr(args, name)!r}; valid values: {', '.join(valid)}")
    check_block_list(args, "kron_layers", fail)
    kron_factors(args)  # fails on a malformed --kron_factors
    if args.kron_progressive_every:
        if args.kron_mlp == "off" or args.moe_experts or args.teacher:
            fail("--kron_progressive_every needs --kron_mlp (fc, proj or both) on dense MLPs, without --moe_experts "
                 "or --teacher")
        last = progressive_swaps(args)[-1][0]
        if last >= total_steps(args):
            fail(f"--kron_progressive_every={args.kron_progressive_every}: the last swap would come at step {last}, "
                 f"after the run's {total_steps(args)} steps; lower it or list fewer --kron_layers")
    if not on(args):
        return
    if args.mlp_act == "swiglu":
        fail("--mlp_act=swiglu and --kron_mlp/--ks_mlp are alternatives (SwiGLU has its own merged weights)")
    if args.moe_experts > 0 and args.kron_mlp == "both":
        check_kron_experts(args, fail)


def check_kron_experts(args: Hyperparameters, fail):
    """--moe_experts with --kron_mlp=both: the widths of GroupedKronLinear's grouped matmuls (grouped_kron_strides)
    must be multiples of 8 elements (16 bytes in bf16), for c_fc and c_proj of the experts."""
    dim, hidden = args.model_dim, moe_expert_hidden(args)
    for which, in_f, out_f in (("fc", dim, hidden), ("proj", hidden, dim)):
        factors = kron_factors(args)[which] or choose_kron_factors(in_f, out_f, args.kron_rank)
        odd = {k: v for k, v in grouped_kron_strides(factors, args.kron_rank).items() if v % 8}
        if odd:
            fail(f"--moe_experts with --kron_mlp=both: expert c_{which} factors (m1, k1, m2, k2)={factors} give "
                 f"torch._grouped_mm strides {odd}, not multiples of 8 (16 bytes); pick --moe_hidden (e.g. a "
                 f"multiple of 64) or --kron_factors so that they are")


def kron_factors(args: Hyperparameters) -> dict:
    """{"fc": (m1, k1, m2, k2) or None, "proj": ...} from --kron_factors (None = KronLinear picks)."""
    if not args.kron_factors:
        return {"fc": None, "proj": None}
    parts = args.kron_factors.split(";")
    hidden = moe_expert_hidden(args) if args.moe_experts > 0 else args.mlp_ratio * args.model_dim
    dim = args.model_dim
    try:
        fc, proj = (tuple(int(v) for v in p.split(",")) for p in parts)
        assert len(fc) == len(proj) == 4
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --kron_factors={args.kron_factors!r}: expected 'm1,k1,m2,k2;m1,k1,m2,k2' "
                         f"(c_fc then c_proj)") from None
    for name, (m1, k1, m2, k2), out_f, in_f in (("c_fc", fc, hidden, dim), ("c_proj", proj, dim, hidden)):
        if m1 * m2 != out_f or k1 * k2 != in_f:
            raise SystemExit(f"error: --kron_factors for {name} need m1*m2={out_f} and k1*k2={in_f}, "
                             f"got {m1 * m2} and {k1 * k2}")
    return {"fc": fc, "proj": proj}


def grouped_kron_strides(factors: tuple, rank: int) -> dict:
    """The inner and outer widths of GroupedKronLinear's two torch._grouped_mm for factors (m1, k1, m2, k2): they are
    row strides forward or backward, and each must be a multiple of 8 (16 bytes of bf16; torch checks on GPU and
    under torch.compile)."""
    m1, k1, m2, k2 = factors
    if kron_contracts_k1_first(*factors):
        return dict(k1=k1, rank_x_m1=rank * m1, rank_x_k2=rank * k2, m2=m2)
    return dict(k2=k2, rank_x_m2=rank * m2, rank_x_k1=rank * k1, m1=m1)


def grouped_kron_transposed(X: Tensor, G: Tensor, H: Tensor, offsets: Tensor) -> Tensor:
    """(G_e X_n H_e^T)^T summed over rank, (P, mh, mg), for rows X (P, p, q) sorted by expert e (offsets: segment
    ends), G (experts, rank, mg, p), H (experts, rank, mh, q). Two grouped matmuls: contract q with H over the P * p
    rows of X (segments scaled by p), then p with G over P * mh rows (segments scaled by mh)."""
    P, p, q = X.shape
    E, r, mh, mg = H.size(0), H.size(1), H.size(2), G.size(2)
    U = torch._grouped_mm(X.reshape(P * p, q), H.permute(0, 3, 1, 2).reshape(E, q, r * mh), offs=offsets * p)
    V = U.view(P, p, r, mh).permute(0, 3, 2, 1).reshape(P * mh, r * p)  # (n, b) rows, (rank, p) columns
    return torch._grouped_mm(V, G.permute(0, 1, 3, 2).reshape(E, r * p, mg), offs=offsets * mh).view(P, mh, mg)


class GroupedKronLinear(nn.Module):
    """One Kronecker-factorized matrix per expert, stacked: A (experts, rank, m1, k1), B (experts, rank, m2, k2),
    W_e = sum_i A_ei (x) B_ei, KronLinear's layout and init per expert. forward(x, offsets) applies to each row of x
    (sorted by expert, as MoE hands them) its own W_e without building it. The fused path is one batched Kronecker
    contraction over all experts: two torch._grouped_mm (one per factor) in KronLinear's cheaper contraction order;
    no per-expert loop, static shapes (tests/features/test_kronecker.py checks it against a loop over experts)."""

    draws_own_init = True  # --weight_init leaves its factors alone (truncated_init.recipe_matrices)

    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, factors=None,
                 zero_init: bool = False):
        super().__init__()
        self.factors = tuple(factors or choose_kron_factors(in_features, out_features, rank))
        m1, k1, m2, k2 = self.factors
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(experts, rank, m1, k1))
        self.B = nn.Parameter(torch.empty(experts, rank, m2, k2))
        kron_factor_init_(self.A, self.B, zero_init)  # zero_init: B only, as KronLinear

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:  # x (rows, in_features) -> (rows, out_features)
        m1, k1, m2, k2 = self.factors
        A, B, X = self.A.type_as(x), self.B.type_as(x), x.view(-1, k1, k2)
        if kron_contracts_k1_first(*self.factors):  # A X B^T = (B X^T A^T)^T: the same routine, roles swapped
            return grouped_kron_transposed(X.mT.contiguous(), B, A, offsets).flatten(1)
        return grouped_kron_transposed(X, A, B, offsets).mT.flatten(1)

    def macs_per_token(self) -> int:
        return kron_macs_per_token(*self.factors, self.rank)

    def extra_repr(self) -> str:
        return (f"experts={len(self.A)}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, factors={self.factors}")


class KronMoE(MoE):
    """--moe_experts with --kron_mlp=both (mixture of Kronecker experts): MoE's routing, each expert's c_fc and
    c_proj a Kronecker sum (GroupedKronLinear; c_proj's B zero-initialized). Factors: --kron_rank, --kron_factors
    (at the expert width) or balanced; trained by --kron_optimizer like KronLinear's."""

    def make_experts(self, args: Hyperparameters):
        dim, n, factors = args.model_dim, self.num_experts + self.num_shared, kron_factors(args)
        self.c_fc = GroupedKronLinear(n, dim, self.hidden, args.kron_rank, factors["fc"])
        self.c_proj = GroupedKronLinear(n, self.hidden, dim, args.kron_rank, factors["proj"], zero_init=True)

    def expert_mlps(self, x: Tensor, offsets: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x, offsets)), offsets)

    def expert_macs(self) -> int:
        return self.c_fc.macs_per_token() + self.c_proj.macs_per_token()


def progressive_swaps(args: Hyperparameters) -> list[tuple[int, int]]:
    """--kron_progressive_every=N: (step, block) pairs; the k-th block of --kron_layers (ascending) turns Kronecker
    at step (k + 1) N. [] without it."""
    if not args.kron_progressive_every:
        return []
    blocks = sorted(factorized_blocks(args.kron_layers, args.num_layers))
    return [((k + 1) * args.kron_progressive_every, b) for k, b in enumerate(blocks)]


class ProgressiveReplacement:
    """--kron_progressive_every: at each swap step, before that step's update, one dense block MLP becomes its
    Kronecker student. The student starts at the Van Loan nearest Kronecker sum of each dense matrix it replaces
    (matrices it keeps are copied), then with --kron_progressive_distill_steps Adam fits it to the dense MLP's output
    on live inputs: the block's MLP inputs for rank 0's first micro-batch of the step, broadcast so every rank fits
    the same student. The optimizers are rebuilt for the new parameter set (exactly what a run resumed after the swap
    builds) and keep the state of every surviving parameter; the new factors start with fresh state."""

    DISTILL_LR = 1e-2  # tools/mlp_init.py's default, decaying linearly to zero

    def __init__(self, model: GPT, args: Hyperparameters, env: DistEnv):
        self.model, self.args, self.env = model, args, env
        self.swaps = dict(progressive_swaps(args))

    def at(self, step: int, optimizers: list, micro_batches: list, window):
        """Swap the block due at `step` (if any); optimizers is updated in place."""
        block = self.swaps.get(step)
        if block is None:
            return
        dense = self.model.blocks[block].mlp
        with torch.random.fork_rng(devices=[]):  # the student's init: the same on every rank, global RNG untouched
            torch.manual_seed(self.args.seed + step)
            student = build_mlp(self.args, block).to(device=self.env.device)
        self.initialize(student, dense)
        if self.args.kron_progressive_distill_steps:
            self.distill(student, dense, self.live_inputs(block, micro_batches[0], window))
        self.model.blocks[block].mlp = student
        old_adam, old_muon = optimizers
        sync = old_muon.grad_sync
        if sync is not None:
            gone = {id(p) for p in dense.parameters()}
            sync.params = [p for p in sync.params if id(p) not in gone]
            sync.add(list(student.parameters()))
        new = build_optimizers(self.model, self.args, self.env.rank, self.env.world_size, grad_sync=sync)
        for old, fresh in zip((old_adam, old_muon), new):
            for group in fresh.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        fresh.state[p] = old.state[p]
        new[1].orthogonalize = old_muon.orthogonalize  # compiled on GPU
        optimizers[:] = new

    @torch.no_grad()
    def initialize(self, student: nn.Module, dense: nn.Module):
        for name in ("c_fc", "c_proj"):
            target, source = getattr(student, name), getattr(dense, name)
            if isinstance(target, KronLinear):
                A, B = van_loan_decompose(source.weight.double(), *target.factors, rank=target.rank)
                target.A.copy_(A)
                target.B.copy_(B)
            else:
                target.load_state_dict(source.state_dict())

    @torch.no_grad()
    def live_inputs(self, block: int, micro_batch: tuple, window) -> Tensor:
        captured = []
        hook = self.model.blocks[block].mlp.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            self.model(*micro_batch, window)
        finally:
            hook.remove()
        x = captured[0].reshape(-1, captured[0].size(-1)).float().contiguous()
        if self.env.world_size > 1:
            dist.broadcast(x, 0)
        return x

    def distill(self, student: nn.Module, dense: nn.Module, x: Tensor):
        with torch.no_grad():
            target = dense(x).float()
        factors = [p for m in student.modules() if isinstance(m, KronLinear) for p in (m.A, m.B)]
        opt = torch.optim.Adam(factors, lr=self.DISTILL_LR)
        steps = self.args.kron_progressive_distill_steps
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = self.DISTILL_LR * (1 - i / steps)
            loss = F.mse_loss(student(x).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.zero_grad(set_to_none=True)



def linear(args: Hyperparameters, which: str, in_features: int, out_features: int, zero_init: bool):
    """c_fc / c_proj as a KronLinear where --kron_mlp asks for it. A zero-initialized KronLinear zeroes one factor
    only (B): with both zero, no factor would ever get a gradient."""
    if args.kron_mlp not in (which, "both"):
        return None
    return KronLinear(in_features, out_features, rank=args.kron_rank, factors=kron_factors(args)[which],
                      impl=args.kron_impl, zero_init=zero_init)


def mlp(args: Hyperparameters, layer: int | None) -> nn.Module | None:
    return KronMoE(args) if args.moe_experts > 0 and args.kron_mlp == "both" else None


def mlp_args(args: Hyperparameters, layer: int) -> Hyperparameters:
    """--kron_mlp off in the blocks --kron_layers leaves out."""
    if on(args) and layer not in factorized_blocks(args.kron_layers, args.num_layers):
        return dataclasses.replace(args, kron_mlp="off")
    return args


def args_at_step(args: Hyperparameters, step: int) -> Hyperparameters:
    """The model a checkpoint written at `step` holds: with --kron_progressive_every only the blocks swapped before
    that step are factorized, because the loop writes step N's checkpoint before swap N (a resumed run builds this
    model, loads the checkpoint into it, then makes swap N itself)."""
    if not args.kron_progressive_every:
        return args
    done = [b for s, b in progressive_swaps(args) if s < step]
    if not done:
        return dataclasses.replace(args, kron_mlp="off")
    return dataclasses.replace(args, kron_layers=",".join(map(str, done)))


def kron_factor_params(model: nn.Module) -> list:
    return [p for m in model.blocks.modules() if isinstance(m, (KronLinear, GroupedKronLinear)) for p in (m.A, m.B)]


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """--kron_optimizer=adam: the factors are Adam's "kron" group (with muon they stay Muon matrices)."""
    factors = kron_factor_params(model) if args is not None and args.kron_optimizer == "adam" else []
    return dict(kron=factors) if factors else {}


def adam_lrs(args: Hyperparameters) -> dict:
    return dict(kron=args.kron_adam_lr)


def per_step(model: GPT, args: Hyperparameters, env: DistEnv):
    return ProgressiveReplacement(model, args, env) if args.kron_progressive_every else None


def log_header(log, run, args: Hyperparameters, env):
    layers = [m for m in run.model.modules() if isinstance(m, KronLinear)]
    if layers:
        k = layers[0]
        log(f"kron_mlp={args.kron_mlp}: {len(layers)} KronLinear layers, e.g. {k.in_features}->{k.out_features} "
            f"rank {k.rank} factors {k.factors}: {sum(count_params(m) for m in layers):,} parameters (dense: "
            f"{sum(m.in_features * m.out_features for m in layers):,})")
