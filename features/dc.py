"""Dynamically-composable attention, r85's lightweight form (--dc_layers; frontier recipe 3.4): after the attention,
each head also reads its own values through a per-token mix of all heads' attention probabilities over a short
window (--dc_window tokens). Its sockets: a hook of the block's attention (the output after attention), the "dc" mask
of the window (built once per forward), its attention FLOPs in describe_model. With --mudd_gate_block the mix
weights come per token from the MUDD gates (the core's gated socket, features/mudd.py). Decoding with a KV cache
refuses it (the cache builds no second window).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import train_gpt  # train_gpt.attend at call time: tools/memory_plan.py stands a FlexAttention in for it
from train_gpt import (Hyperparameters, gated_or, kv_heads, parse_layer_list, refuse_without_head_hooks,
                       token_window_mask_builder)

NO_KV_CACHE = "--dc_layers"


@dataclass
class Flags:
    # dynamically-composable attention (features/dc.py; frontier recipe 3.4, r85)
    dc_layers: str = ""  # blocks adding dynamically-composed attention: heads' probabilities mixed per token (r85)
    dc_window: int = 112  # DC's window in tokens (within the document, this token included)


MIN_VALUES = dict(dc_window=1)
NEEDS = dict(dc_window=("--dc_layers", lambda a: bool(a.dc_layers)))


def on(args: Hyperparameters) -> bool:
    return bool(args.dc_layers.strip())


def check(args: Hyperparameters, fail):
    """Multi-head attention blocks that are not paired (the head mix rolls values across heads)."""
    attention = set(range(args.num_layers)) - set(parse_layer_list(args.no_attn_layers))
    try:
        dc = parse_layer_list(args.dc_layers)
    except ValueError:
        fail(f"--dc_layers={args.dc_layers!r}: expected comma-separated block indices such as '10'")
    try:
        paired = set(parse_layer_list(args.paired_head_layers))
    except ValueError:
        paired = set()  # features/paired_heads.py's check says what is wrong with it
    bad = sorted(set(dc) - attention) + sorted(set(dc) & paired)
    if bad or len(set(dc)) != len(dc):
        fail(f"--dc_layers={args.dc_layers!r} must name different blocks with attention and without paired heads; "
             f"{bad or 'a block twice'}")
    if dc:
        refuse_without_head_hooks(args, "--dc_layers", fail)
    if dc and kv_heads(args) != args.num_heads:
        fail("--dc_layers mixes every head's probabilities onto every head's values: it needs multi-head attention "
             "(no --n_kv_heads, no --mla_kv_rank)")


def head_hooks(attn: nn.Module, args: Hyperparameters, layer: int):
    if layer in parse_layer_list(args.dc_layers):
        attn.dc = gated_or("dc", args, layer, lambda: DynamicComposition(args.num_heads))


def dc_mask(inputs: Tensor, tokens: int):
    return token_window_mask_builder(inputs)(inputs, tokens)


def masks(args: Hyperparameters) -> dict:
    """The token window of --dc_window ("dc"), which DC reads from sources["masks"]."""
    return dict(dc=functools.partial(dc_mask, tokens=args.dc_window)) if on(args) else {}


def score_flops(model: nn.Module, args: Hyperparameters) -> list:
    """heads more attention calls per DC block over its token window (compose_heads)."""
    if not on(args):
        return []
    window = min(args.dc_window, model.eval_chunk_tokens)
    flops = sum(b.attn.num_heads * 2 * window * b.attn.num_heads * (b.attn.qk_dim + b.attn.v_dim)
                for i, b in enumerate(model.blocks) if i in parse_layer_list(args.dc_layers))
    return [("DC", flops)]


def compose_heads(y: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, mask, w1: Tensor, w2: Tensor) -> Tensor:
    """DC's y_h += w2_h sum_s (sum_h' w1n_h' P_h'(t, s)) v_h(s), w1n = w1 / sqrt(mean_h(w1^2) + 1e-6); y (B, T,
    heads, head_dim), q, k, v (B, heads, T, head_dim) as attend takes them, w1 and w2 broadcasting to (B, T, heads,
    1). FlexAttention returns per-head P_h V_h only, so the head mix runs over rolled values: call j gives head h'
    its own probabilities on head h' + j's values, weighed by w1n_h' and rolled back onto head h' + j; the sum over
    j covers every h'. The mix reads each output transposed, token-major like y: inductor's CPU FlexAttention
    template cannot take a pointwise epilogue, which a head-major multiply would become."""
    w1n = (w1.float() * torch.rsqrt(w1.float().square().mean(-2, keepdim=True) + 1e-6))
    mixed = 0
    for j in range(q.size(1)):
        probs_on_rolled = train_gpt.attend(q, k, v.roll(-j, dims=1), mask, scale).transpose(1, 2)
        mixed = mixed + (w1n * probs_on_rolled).roll(j, dims=2)
    return y + (w2 * mixed).type_as(y)


class DynamicComposition(nn.Module):
    """--dc_layers (frontier recipe 3.4, r85's lightweight dynamically-composable attention): after the attention,
    each head also reads its own values through a mix of all heads' attention probabilities over a short window,
      P_h(t, s) = softmax_s(scale q_h(t) . k_h(s)) over s in t's document, t - s < --dc_window (112),
      y_h(t) += w2_h sum_s (sum_h' w1n_h' P_h'(t, s)) v_h(s),   w1n = w1 / RMS_h(w1),
    with the attention's own q, k (normed, rotated, key-offset), v (value embedding added) and scale, so a head can
    look where another head looks. w1 (init 1) and w2 (init 0: no change at init) per head, Adam scalars here;
    per token from the MUDD gates in GatedDynamicComposition. Cost: heads extra attention calls over the short
    window (compose_heads; the recipe's Triton kernel computes the softmax once, these recompute it per call)."""

    def __init__(self, heads: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.ones(heads))
        self.w2 = nn.Parameter(torch.zeros(heads))

    def forward(self, y: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, sources: dict) -> Tensor:
        return compose_heads(y, q, k, v, scale, sources["masks"]["dc"], self.w1[:, None], self.w2[:, None])
