"""Per-sub-layer lambdas (--sublayer_lambdas; frontier recipe 3.3, r45): each sub-layer scales the residual and its
own output, x <- r_a x + p_a attn + l x0, x <- r_m x + p_m mlp, with x0 entering after the attention. Its sockets:
the block (SublayerBlock; MUDD's block takes its own place first), the Adam groups "resid_lambdas" and
"post_lambdas" (their LRs from --adam_group_lr). Its entry_gate is where MUDD's second gate runs (features/mudd.py
installs it), and its x0 and bigram terms are weighed per token when a feature serves them (the core's gated socket).
Cost: 4 scalars per block.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import (Hyperparameters, LearnedAdd, PassThrough, build_attention, build_mlp, built_by_feature,
                       gated_or, norm, parse_layer_list)

SMALL_ADAM_GROUPS = ("resid_lambdas", "post_lambdas")


@dataclass
class Flags:
    # per-sub-layer lambdas (features/sublayer.py; frontier recipe 3.3)
    sublayer_lambdas: bool = False  # x = r_a x + p_a attn + l x0; x = r_m x + p_m mlp (r45; r = sqrt(x-lambda init))


def on(args: Hyperparameters) -> bool:
    return args.sublayer_lambdas


def check(args: Hyperparameters, fail):
    if on(args) and args.resid_lambda_init < 0:
        fail(f"--sublayer_lambdas starts each sub-layer's r at sqrt(--resid_lambda_init); "
             f"resid_lambda_init={args.resid_lambda_init} must be >= 0")


def block(args: Hyperparameters, layer: int, max_seq_len: int) -> nn.Module | None:
    return SublayerBlock(args, layer, max_seq_len) if on(args) else None


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """The record trains the r's and the p's in Adam groups of their own."""
    blocks = [b for b in model.blocks if isinstance(b, SublayerBlock)]
    if not blocks:
        return {}
    return dict(resid_lambdas=[b.resid_lambdas for b in blocks], post_lambdas=[b.post_lambdas for b in blocks])


def lambdas_as_stored(lambdas: Tensor) -> Tensor:
    return lambdas


def lambdas_in_bf16(lambdas: Tensor) -> Tensor:
    return lambdas.bfloat16()


LAMBDA_READS = dict(r21=lambdas_as_stored, record=lambdas_in_bf16)  # --param_dtype: SublayerBlock's r and p


class SublayerBlock(nn.Module):
    """--sublayer_lambdas (frontier recipe 3.3, r45): each sub-layer scales the residual and its own output,
      a = Attn(RMSNorm(u)),   x <- r_a x + p_a a + l x0 (+ g_b b),   x <- r_m x + p_m MLP(RMSNorm(x)),
    u = x or an earlier block's output (--attn_input_skips, r77). r starts at sqrt(--resid_lambda_init) in each
    sub-layer (the recipe's sqrt(1.1): 1.1 per block, like #21's one x-lambda at 1.1), p at 1. x0 enters after the
    attention (#21's Block adds it before), times a learned scalar l (init 0) or, under --mudd_gate_block, a per-token
    MUDD gate g_x0, which also brings the bigram embedding b in times its gate g_b (blocks after the first; block
    0's g_b weighs b at the input). An attention-free block is its MLP sub-layer alone (the recipe's layer 6).
    The r's are one parameter (resid_lambdas: r_a, r_m) and the p's another (post_lambdas: p_a, p_m), because the
    record trains them in Adam groups of their own (param_groups); under --param_dtype=record they are read rounded
    to bf16, as the record's forward reads them (sqrt(1.1) = 1.0488 acts as 1.0469; on a GPU a 0-dim fp32 factor of
    a bf16 activation is rounded so anyway). entry_gate: PassThrough, or in block --mudd_gate_block the gate that
    reads its input (GPT puts it there)."""

    def __init__(self, args: Hyperparameters, layer: int, max_seq_len: int):
        super().__init__()
        has_attn = layer not in parse_layer_list(args.no_attn_layers)
        r = args.resid_lambda_init ** 0.5
        self.attn = build_attention(args, max_seq_len, layer) if has_attn else None
        self.attn_input = PassThrough()  # --attn_input_skips: an earlier block's output (its install)
        self.add_x0 = gated_or("x0", args, layer, lambda: LearnedAdd(0.0)) if has_attn else None
        bigram = built_by_feature("gated", "bigram", args, layer) if has_attn and layer > 0 else None
        self.add_bigram = PassThrough() if bigram is None else bigram
        self.mlp = build_mlp(args, layer)
        self.resid_lambdas = nn.Parameter(torch.tensor([r, r] if has_attn else [r]))  # r_a, r_m
        self.post_lambdas = nn.Parameter(torch.ones(2 if has_attn else 1))  # p_a, p_m
        self.read_lambdas = LAMBDA_READS[args.param_dtype]
        self.entry_gate = PassThrough()
        self.dropout = nn.Identity()  # --dropout: features/dropout.py installs it

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mask, sources: dict) -> Tensor:
        self.entry_gate(x, sources)
        r, p = self.read_lambdas(self.resid_lambdas), self.read_lambdas(self.post_lambdas)
        if self.attn is not None:
            a = self.attn(norm(self.attn_input(x, sources)), ve, mask, sources)
            x = r[0] * x + p[0] * self.dropout(a)
            x = self.add_bigram(self.add_x0(x, x0, sources), sources.get("bigram"), sources)
        return r[-1] * x + p[-1] * self.dropout(self.mlp(norm(x)))
