"""Truncated-normal init (--weight_init=truncated; an architecture ablation, issue 6): after the model is built,
every matrix the recipe draws from its uniform is redrawn from a normal cut at 2 of its std, with the same std.
Its socket: a --weight_init value of its own (WEIGHT_INITS), which build_model applies. Cost: none after init.
"""
import math

import torch
import torch.nn as nn

from train_gpt import CastedLinear, Hyperparameters


def on(args: Hyperparameters) -> bool:
    return args.weight_init == "truncated"


# Std of a standard normal truncated to [-2, 2]. --weight_init=truncated draws N(0, (s / TRUNC2_STD)^2) cut at 2 of
# that std, so the drawn values keep the uniform's std s = 0.5 / sqrt(fan_in) (the variance-preserving convention
# of truncated-normal variance scaling): only the shape of the distribution changes.
TRUNC2_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))


def recipe_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The matrices drawn from the recipe's uniform(+-sqrt(3) * 0.5 / sqrt(fan_in)), fan_in = the last dim: every
    parameter of >= 2 dims except embeddings (N(0, 1)), Kronecker/KS factors (their own fan-in rule) and the
    zero-initialized ones (output projections, the untied head)."""
    own_init = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    own_init |= {id(p) for m in model.modules() if getattr(m, "draws_own_init", False) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if isinstance(head, CastedLinear):  # zeros, or its own normal draw (--head_init_std)
        own_init.add(id(head.weight))
    return [p for p in model.parameters() if p.ndim >= 2 and id(p) not in own_init and p.any()]


@torch.no_grad()
def truncated_normal_init_(model: nn.Module) -> nn.Module:
    """--weight_init=truncated: redraw every recipe matrix from a normal cut at 2 of its std, scaled so the values
    keep the uniform's std 0.5 / sqrt(fan_in)."""
    for p in recipe_matrices(model):
        std = 0.5 * p.size(-1) ** -0.5 / TRUNC2_STD
        nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
    return model


WEIGHT_INITS = dict(truncated=truncated_normal_init_)  # --weight_init=truncated
