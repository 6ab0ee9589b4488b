"""Mixture of experts (--moe_experts > 0): each block's MLP becomes routed experts plus shared ones, run dropless
through torch._grouped_mm. Its sockets: the block MLP, an optimizer hook (aux-loss-free routing biases), the
validation log's per-block expert load. Kronecker experts (--kron_mlp=both) are features/kronecker.py's KronMoE.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import CastedLinear, Hyperparameters, activation, all_reduce_sum_


@dataclass
class Flags:
    # mixture of experts (features/moe.py)
    moe_experts: int = 0  # mixture-of-experts MLP when > 0: routed experts per block
    moe_shared: int = 0  # always-on shared experts (no routing)
    moe_topk: int = 2  # routed experts per token
    moe_hidden: int = 0  # expert width (0 = mlp_ratio * model_dim / (moe_topk + moe_shared) [x 2/3 swiglu], to 64)
    moe_balance: str = "aux"  # aux (load-balancing loss) | bias (aux-loss-free routing bias)
    moe_aux_coef: float = 0.01  # aux: loss += coef * experts * sum_e load_e * mean_prob_e (1 * coef at balance)
    moe_bias_rate: float = 0.001  # bias: per optimizer step, bias_e += rate * sign(mean load - load_e)


NEEDS = dict(
    moe_shared=("--moe_experts > 0", lambda a: a.moe_experts > 0),
    moe_topk=("--moe_experts > 0", lambda a: a.moe_experts > 0),
    moe_hidden=("--moe_experts > 0", lambda a: a.moe_experts > 0),
    moe_balance=("--moe_experts > 0", lambda a: a.moe_experts > 0),
    moe_aux_coef=("--moe_experts > 0 and --moe_balance=aux", lambda a: a.moe_experts > 0 and
                  a.moe_balance == "aux"),
    moe_bias_rate=("--moe_experts > 0 and --moe_balance=bias", lambda a: a.moe_experts > 0 and
                   a.moe_balance == "bias"),
)


def on(args: Hyperparameters) -> bool:
    return args.moe_experts > 0


def replaces_dense_mlp(args: Hyperparameters) -> str | None:
    return f"--moe_experts={args.moe_experts}" if on(args) else None


def check(args: Hyperparameters, fail):
    if args.moe_balance not in ("aux", "bias"):
        fail(f"--moe_balance={args.moe_balance!r}; valid values: aux, bias")
    if args.moe_experts < 0:
        fail(f"--moe_experts={args.moe_experts} must be >= 0 (0 = dense MLP)")
    if args.moe_experts == 0:
        return
    if not 1 <= args.moe_topk <= args.moe_experts:
        fail(f"--moe_topk={args.moe_topk}; valid values: 1..moe_experts={args.moe_experts}")
    if args.moe_shared < 0 or args.moe_hidden < 0:
        fail("--moe_shared and --moe_hidden must be >= 0")
    if moe_expert_hidden(args) % 8 or args.model_dim % 8:
        fail(f"--moe_hidden={args.moe_hidden} and model_dim={args.model_dim} must be multiples of 8 (16-byte "
             f"strides for torch._grouped_mm)")
    if args.mlp_act not in ("relu2", "gelu", "swiglu"):
        fail(f"--moe_experts: experts support --mlp_act relu2, gelu or swiglu, not {args.mlp_act!r}")
    if args.ks_mlp != "off" or args.kron_mlp not in ("off", "both"):
        fail(f"--moe_experts with --kron_mlp={args.kron_mlp} --ks_mlp={args.ks_mlp}: experts factorize only as "
             f"--kron_mlp=both (each expert a pair of Kronecker sums); use that or turn the factorization off")
    if args.moe_aux_coef < 0 or args.moe_bias_rate < 0:
        fail("--moe_aux_coef and --moe_bias_rate must be >= 0")
    if not hasattr(torch, "_grouped_mm"):
        fail(f"--moe_experts needs torch._grouped_mm (torch >= 2.8); this is torch {torch.__version__}")


def moe_expert_hidden(args: Hyperparameters) -> int:
    """--moe_hidden, or the dense MLP width split over the experts a token uses (active FLOPs = dense; swiglu experts
    take 2/3 of it, their c_fc being twice as wide), rounded to a multiple of 64 (torch._grouped_mm wants 16-byte
    strides)."""
    dense = args.mlp_ratio * args.model_dim / (args.moe_topk + args.moe_shared)
    if args.mlp_act == "swiglu":
        dense *= 2 / 3
    return args.moe_hidden or max(64, round(dense / 64) * 64)


class MoE(nn.Module):
    """Mixture-of-experts MLP (--moe_experts > 0): `experts` routed experts, each token picks `topk` of them, plus
    `shared` experts every token uses; each expert is a relu^2, gelu or SwiGLU (GatedSiLU) MLP of width `hidden`
    (KronMoE: its two matrices are Kronecker sums).

    Routing: probs = softmax(router(x)) in fp32; a token takes the top-k experts by probs + bias and weights their
    outputs by probs (not renormalized, so the router gets gradients even at top-1). Shared experts are simply
    experts that every token picks with weight 1, so one code path computes all of them. Dropless and fixed-shape:
    the N * (topk + shared) (token, expert) pairs are sorted by expert and run through torch._grouped_mm over the
    contiguous per-expert segments (offsets from the counts): no token is dropped, no capacity padding, no
    data-dependent shapes, so torch.compile sees one static graph. Outputs return to (token, slot) order by the
    inverse permutation (a gather, deterministic), then are summed with their gates.

    Balancing (--moe_balance): `aux` adds aux_coef * experts * sum_e f_e * P_e to the training loss (f_e: share of
    the routed assignments that went to e, P_e: mean router prob of e; 1 * aux_coef when both are uniform, larger
    otherwise); `bias` (aux-loss-free) leaves the loss alone and, after every optimizer step, moves the selection bias
    by bias_rate * sign(mean load - load_e) using the step's loads summed over micro-batches and ranks
    (update_moe_biases, an optimizer hook): under-used experts become more likely to be picked. The bias only
    selects; it never scales outputs.
    """

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, E, S = args.model_dim, args.moe_experts, args.moe_shared
        self.num_experts, self.num_shared, self.topk, self.hidden = E, S, args.moe_topk, moe_expert_hidden(args)
        self.router = CastedLinear(dim, E)
        self.make_experts(args)
        self.act = activation(args.mlp_act, self.hidden)
        self.aux_coef = args.moe_aux_coef if args.moe_balance == "aux" else 0.0
        self.bias_rate = args.moe_bias_rate if args.moe_balance == "bias" else 0.0
        self.register_buffer("shared_ids", torch.arange(E, E + S), persistent=False)
        self.register_buffer("bias", torch.zeros(E))  # selection bias (moves only with --moe_balance=bias)
        self.register_buffer("load", torch.zeros(E))  # training assignments since the last optimizer step
        self.register_buffer("eval_load", torch.zeros(E))  # validation assignments since moe_utilization()
        self.aux_loss = None  # set by forward, read (and cleared) by GPT.aux_loss
        self.balance = args.moe_balance

    def make_experts(self, args: Hyperparameters):
        """fc_w (experts, hidden, dim) (swiglu: 2 * hidden rows, [gate | up]) and the zero-initialized proj_w."""
        dim, n = args.model_dim, self.num_experts + self.num_shared
        width = 2 * self.hidden if args.mlp_act == "swiglu" else self.hidden
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.fc_w = nn.Parameter(torch.empty(n, width, dim).uniform_(-bound, bound))  # (experts, out, in)
        self.proj_w = nn.Parameter(torch.zeros(n, dim, self.hidden))  # zero-initialized like c_proj

    def expert_mlps(self, x: Tensor, offsets: Tensor) -> Tensor:
        """x (pairs, dim) sorted by expert (expert e's rows end at offsets[e]) -> each row through its expert."""
        h = self.act(torch._grouped_mm(x, self.fc_w.type_as(x).mT, offs=offsets))
        return torch._grouped_mm(h, self.proj_w.type_as(x).mT, offs=offsets)

    def expert_macs(self) -> int:
        """Multiply-accumulates of one (token, expert) pair."""
        return self.fc_w[0].numel() + self.proj_w[0].numel()

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, dim) -> experts (N, topk + shared), gates (N, topk + shared), router probs (N, experts)."""
        probs = self.router(x).float().softmax(-1)
        top = torch.topk(probs + self.bias, self.topk, dim=-1).indices
        N = x.size(0)
        experts = torch.cat([top, self.shared_ids.expand(N, -1)], dim=-1)
        gates = torch.cat([probs.gather(-1, top), probs.new_ones(N, self.num_shared)], dim=-1)
        return experts, gates, probs

    def forward(self, x: Tensor) -> Tensor:
        shape, x = x.shape, x.flatten(0, -2)
        N, slots = x.size(0), self.topk + self.num_shared
        experts, gates, probs = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = flat.new_zeros(self.num_experts + self.num_shared, dtype=torch.int32).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))  # pairs per expert (static shape, unlike bincount)
        offsets = counts.cumsum(0, dtype=torch.int32)
        y = self.expert_mlps(x[order // slots], offsets)[order.argsort()].view(N, slots, -1)
        self.observe(counts[:self.num_experts].float(), probs)
        return (y * gates.type_as(y)[..., None]).sum(1).view(shape)

    def observe(self, load: Tensor, probs: Tensor):
        """Record the routed load (for bias balancing and the utilization log) and the aux loss."""
        f = load / (len(probs) * self.topk)
        self.aux_loss = self.aux_coef * self.num_experts * (f * probs.mean(0)).sum()
        with torch.no_grad():
            (self.load if self.training else self.eval_load).add_(load)

    @torch.no_grad()
    def update_bias(self, load: Tensor):
        self.bias += self.bias_rate * torch.sign(load.mean() - load)

    def flops_per_token(self) -> int:
        return 2 * self.router.weight.numel() + 2 * (self.topk + self.num_shared) * self.expert_macs()

    def summary(self) -> str:
        """describe_model's note after the MLP kind."""
        return (f", {self.num_experts} experts top-{self.topk} + {self.num_shared} shared of width {self.hidden} "
                f"({self.balance} balancing)")


@torch.no_grad()
def update_moe_biases(model: nn.Module, world_size: int):
    """After each optimizer step (a Muon hook): sum every MoE layer's training load over ranks, move the selection
    biases (--moe_balance=bias; aux leaves them at 0) and reset the loads."""
    layers = moe_layers(model)
    loads = all_reduce_sum_(torch.stack([m.load for m in layers]), world_size)
    for moe, load in zip(layers, loads):
        moe.update_bias(load)
        moe.load.zero_()


def moe_utilization(model: nn.Module) -> str:
    """' moe_load_min_max:0.91-1.12,...' for the validation log line: per MoE block, the least and the most used
    expert's share of the routed assignments relative to uniform (1.00-1.00 = perfectly balanced), over this rank's
    validation tokens since the last call; '' without MoE."""
    if not moe_layers(model):
        return ""
    parts = []
    for moe in moe_layers(model):
        share = moe.eval_load * moe.num_experts / moe.eval_load.sum().clamp_min(1)
        parts.append(f"{share.min().item():.2f}-{share.max().item():.2f}")
        moe.eval_load.zero_()
    return " moe_load_min_max:" + ",".join(parts)



def mlp(args: Hyperparameters, layer: int | None) -> nn.Module | None:
    """The block's MLP: routed experts (--kron_mlp=both: features/kronecker.py builds Kronecker experts)."""
    return MoE(args) if on(args) and args.kron_mlp != "both" else None


def moe_layers(model: nn.Module) -> list:
    return [block.mlp for block in model.blocks if isinstance(block.mlp, MoE)]


def optimizer_hooks(model: nn.Module, adam, muon, args: Hyperparameters, world_size: int):
    if moe_layers(model):
        muon.register_step_post_hook(lambda *_: update_moe_biases(model, world_size))


def val_log(model: nn.Module) -> str:
    return moe_utilization(model)
