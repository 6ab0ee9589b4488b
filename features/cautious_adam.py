"""Cautious Adam (--adam_wd > 0; frontier recipe section 2.2): Adam whose weight decay pulls a weight toward zero
only where its update already does, with a multiplier per Adam group (--adam_group_wd). Its socket: the Adam
optimizer (CautiousAdam over the core's groups, each with its weight_decay). Cost: fp32 moments (torch's Adam keeps
them in the parameter's dtype), a sign and a multiply-add per element where decay acts.
"""
from dataclasses import dataclass

import torch

from train_gpt import Hyperparameters, parse_group_values


@dataclass
class Flags:
    # cautious Adam weight decay (features/cautious_adam.py; frontier recipe 2.2)
    adam_wd: float = 0.0  # cautious Adam weight decay when > 0: W -= lr^2 * adam_wd * group_wd * W where update*W > 0
    adam_group_wd: str = ""  # per-group multipliers of adam_wd "head=150,value_embeds=5" (groups not named: 1)


MIN_VALUES = dict(adam_wd=0.0)
NEEDS = dict(adam_group_wd=("--adam_wd > 0", lambda a: a.adam_wd > 0))


def on(args: Hyperparameters) -> bool:
    return args.adam_wd > 0


def check(args: Hyperparameters, fail):
    parse_group_values(args.adam_group_wd, "adam_group_wd", float)


def adam(groups: list[dict], args: Hyperparameters) -> torch.optim.Optimizer | None:
    """CautiousAdam over the core's groups, each decayed at adam_wd times its --adam_group_wd multiplier."""
    if not on(args):
        return None
    wd_mults = parse_group_values(args.adam_group_wd, "adam_group_wd", float)
    groups = [dict(group, weight_decay=args.adam_wd * wd_mults.get(group["name"], 1.0)) for group in groups]
    return CautiousAdam(groups, lr=args.head_lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


class CautiousAdam(torch.optim.Optimizer):
    """Adam with cautious weight decay (--adam_wd > 0; frontier recipe section 2.2). Bias-corrected, eps outside
    the square root: update = lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), fp32 moments. Where
    update * W > 0 (strictly: decay only pulls W toward zero where the update already does), the update gains
    lr^2 * weight_decay * W; then W -= update in one subtraction, as the record's code does: a bf16 parameter
    (--param_dtype=record) is rounded once, so an update below half its last bit is lost, as in the record.

    The frontier model has 54 Adam tensors, 46 of them scalars and small gate matrices: those (below
    FOREACH_NUMEL elements) are updated together per (device, dtype) with torch._foreach ops, the same arithmetic
    in the same order (bit for bit, tests/features/test_cautious_adam.py), about 10 kernel launches per such group
    instead of ~10 per tensor; the large tables one at a time, so the step's fp32 temporaries stay those of one
    table."""
    FOREACH_NUMEL = 1 << 20

    def __init__(self, params, lr: float, betas: tuple, eps: float, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            decay = lr * lr * group["weight_decay"]
            batches = {}  # (device, dtype) -> small tensors; each large one alone
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                key = (p.device, p.dtype) if p.numel() < self.FOREACH_NUMEL else id(p)
                batches.setdefault(key, []).append(p)
            for params in batches.values():
                self.update(params, b1, b2, lr, eps, decay)

    def update(self, params: list, b1: float, b2: float, lr: float, eps: float, decay: float):
        """One Adam step for tensors of one device and dtype (their states exist, steps counted)."""
        states = [self.state[p] for p in params]
        m, v, g = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [p.grad.float() for p in params]
        torch._foreach_lerp_(m, g, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        update = torch._foreach_div(m, torch._foreach_add(torch._foreach_sqrt(v), eps))
        torch._foreach_mul_(update, [lr * (1 - b2 ** s["step"]) ** 0.5 / (1 - b1 ** s["step"]) for s in states])
        if decay:  # W where update * W > 0, else 0 (sign clamped at 0: the same 1/0 mask as a comparison)
            weights = [p.float() for p in params]
            agree = torch._foreach_clamp_min(torch._foreach_sign(torch._foreach_mul(update, weights)), 0.0)
            torch._foreach_add_(update, torch._foreach_mul(weights, agree), alpha=decay)
        torch._foreach_sub_(params, update)  # fp32 updates: a bf16 parameter is rounded once
