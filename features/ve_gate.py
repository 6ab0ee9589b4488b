"""--ve_gate (frontier recipe 3.4, r55 with r70's input): each head's value embedding times 2 sigmoid(w_h . [h[:6],
ve[:6]]), h the normed attention input. Its sockets: a hook of the block's attention (on the blocks that read a
value embedding; MUDD's block replaces it by its own per-token gates), the Adam group "ve_gate" (its LR from
--adam_group_lr, bf16 under --param_dtype=record: the record trains the gate bank so). Cost: a (heads, 12) matrix per
gated block, counted among the attention's matrices in describe_model.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import Hyperparameters, kv_heads, refuse_without_head_hooks, value_embed_dim, value_embed_tables

SMALL_ADAM_GROUPS = ("ve_gate",)
RECORD_BF16_GROUPS = ("ve_gate",)
NEEDS = dict(ve_gate=("--num_value_embeds > 0 (it gates the value embeddings)", lambda a: a.num_value_embeds > 0))


@dataclass
class Flags:
    # the value-embedding gate (features/ve_gate.py; frontier recipe 3.4)
    ve_gate: bool = False  # value embeddings times 2 sigmoid(w_h . [h[:6], ve[:6]]) per head (w 0: gate 1)


def on(args: Hyperparameters) -> bool:
    return args.ve_gate


def check(args: Hyperparameters, fail):
    if not on(args):
        return
    refuse_without_head_hooks(args, "--ve_gate", fail)
    if min(args.model_dim, value_embed_dim(args)) < 6:
        fail(f"--ve_gate reads 6 dims of the attention input and of the value embedding; model_dim="
             f"{args.model_dim}, value-embedding width {value_embed_dim(args)}")


def head_hooks(attn: nn.Module, args: Hyperparameters, layer: int):
    if on(args) and value_embed_tables(args)[layer] is not None:
        attn.ve_gate = ValueEmbedGate(kv_heads(args))


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """The gates are matrices, yet Adam's (the record's own group)."""
    gates = [m.weight for m in model.modules() if isinstance(m, ValueEmbedGate)]
    return dict(ve_gate=gates) if gates else {}


class ValueEmbedGate(nn.Module):
    """--ve_gate (frontier recipe 3.4, r55 with r70's input): each head's value embedding times
    g_h = 2 sigmoid(w_h . [h[:6], ve[:6]]), h the normed attention input, ve[:6] the first 6 dims of the whole
    value embedding. w zero: g = 1, the ungated model at init."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, 12))

    def forward(self, ve: Tensor, x: Tensor) -> Tensor:  # ve (B, T, kv_heads, head_dim), x (B, T, dim)
        features = torch.cat([x[..., :6], ve.flatten(-2)[..., :6]], dim=-1)
        return 2 * torch.sigmoid(F.linear(features, self.weight.type_as(x)))[..., None] * ve
