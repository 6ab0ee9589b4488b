"""Exclusive self-attention (--xsa_layers; frontier recipe 3.4, r82's static form, r85's set of blocks): each head's
output loses tanh(alpha_h) of its component along its own token's value. Its socket: a hook of the block's attention
(the output before the gate); with --mudd_gate_block the alphas come per token from the MUDD gates (the core's gated
socket, features/mudd.py). Cost: one alpha per head and block; elementwise work (not counted in describe_model).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import Hyperparameters, gated_or, kv_heads, parse_layer_list, refuse_without_head_hooks


@dataclass
class Flags:
    # exclusive self-attention (features/xsa.py; frontier recipe 3.4)
    xsa_layers: str = ""  # blocks whose heads remove tanh(alpha_h) of their output's projection on v (alpha 0)


def on(args: Hyperparameters) -> bool:
    return bool(args.xsa_layers.strip())


def check(args: Hyperparameters, fail):
    """Blocks with attention, without paired heads (as in the recipe, r58), of attention with per-head hooks."""
    try:
        xsa = parse_layer_list(args.xsa_layers)
    except ValueError:
        fail(f"--xsa_layers={args.xsa_layers!r}: expected comma-separated block indices such as '2,4,5'")
    attention = set(range(args.num_layers)) - set(parse_layer_list(args.no_attn_layers))
    bad = sorted(set(xsa) - attention)
    if bad:
        fail(f"--xsa_layers names blocks {bad} without attention; blocks with attention: "
             f"{','.join(map(str, sorted(attention)))}")
    if xsa:
        refuse_without_head_hooks(args, "--xsa_layers", fail)
    try:
        paired = set(parse_layer_list(args.paired_head_layers))
    except ValueError:
        return  # features/paired_heads.py's check says what is wrong with it
    both = sorted(paired & set(xsa))
    if both:
        fail(f"--paired_head_layers and --xsa_layers both name blocks {both}; a paired block has no XSA (as in "
             f"the recipe): drop those blocks from one of the lists")


def head_hooks(attn: nn.Module, args: Hyperparameters, layer: int):
    if layer in parse_layer_list(args.xsa_layers):
        attn.xsa = gated_or("xsa", args, layer, lambda: ExclusiveSelfAttention(args.num_heads, kv_heads(args)))


class ExclusiveSelfAttention(nn.Module):
    """XSA (--xsa_layers; frontier recipe 3.4, r82's static form, arXiv 2603.09078): each head's output loses
    tanh(alpha_h) of its component along its own token's value, y_h - tanh(alpha_h) (y_h . v_h / max(|v_h|^2,
    1e-8)) v_h, so a head is pushed to carry what its token does not already hold. alpha per head, zero-init (no
    change at init). Grouped-query heads use their K/V head's value."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(heads))
        self.group = heads // kv_heads

    def forward(self, y: Tensor, v: Tensor, sources: dict | None = None) -> Tensor:
        return remove_value_component(y, v, self.group, torch.tanh(self.alpha)[:, None])


def remove_value_component(y: Tensor, v: Tensor, group: int, strength: Tensor) -> Tensor:
    """XSA's y_h - strength_h (y_h . v_h / max(|v_h|^2, 1e-8)) v_h; y (B, T, heads, head_dim), v (B, T, kv_heads,
    head_dim), strength broadcasting to (B, T, heads, 1)."""
    v = v.unsqueeze(-2).expand(*v.shape[:-1], group, v.size(-1)).flatten(-3, -2)
    dot = (y.float() * v.float()).sum(-1, keepdim=True)
    coef = dot / (v.float() * v.float()).sum(-1, keepdim=True).clamp_min(1e-8)
    return y - (strength * coef).type_as(y) * v
