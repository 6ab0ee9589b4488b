"""--attn_gate (frontier recipe 3.4, r28's sparse attention gate): each head's output times sigmoid(w_h . h[:12]),
h the normed attention input. Its socket: a hook of the block's attention (the output gate), except on the blocks
whose heads a feature scales per token (--mudd_gate_attn_layers: the core's gated socket, features/mudd.py). Cost: a
(heads, 12) matrix per block (Muon's, as r28), counted among the attention's matrices in describe_model.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import Hyperparameters, PassThrough, refuse_without_head_hooks


@dataclass
class Flags:
    # the sparse attention gate (features/attn_gate.py; frontier recipe 3.4)
    attn_gate: bool = False  # every attention head's output times sigmoid(w_h . h[:12]), h its normed input (w 0)


def on(args: Hyperparameters) -> bool:
    return args.attn_gate


def check(args: Hyperparameters, fail):
    if not on(args):
        return
    refuse_without_head_hooks(args, "--attn_gate", fail)
    if args.model_dim < 12:
        fail(f"--attn_gate reads the first 12 dims of the attention input; model_dim={args.model_dim}")


def head_hooks(attn: nn.Module, args: Hyperparameters, layer: int):
    if on(args) and type(attn.out_gate) is PassThrough:  # a per-token head scale (MUDD gates) takes precedence
        attn.out_gate = AttentionGate(args.num_heads)


class AttentionGate(nn.Module):
    """--attn_gate (frontier recipe 3.4, r28's sparse attention gate): each head's output times
    sigmoid(w_h . h[:12]), h the normed attention input, so a head can switch itself off per token (no attention
    sink needed). w zero: every head starts at half strength. Trained by Muon like r28 (a (heads, 12) matrix
    inside the blocks; param_groups puts every such matrix there)."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, 12))

    def forward(self, y: Tensor, x: Tensor, sources: dict | None = None) -> Tensor:  # y (B, T, H, hd), x (B, T, dim)
        return torch.sigmoid(F.linear(x[..., :12], self.weight.type_as(x)))[..., None] * y
