"""Paired-head attention (--paired_head_layers; frontier recipe 3.4, record r58): in the listed blocks heads g and
g + H/2 attend as one interleaved sequence of 2T positions, so each query sees both heads' keys in one softmax. Its
sockets: the block's attention (PairedSelfAttention / PairedGroupedQueryAttention: the core's attention, the same
parameters and init, the same per-head hooks, a rotary table twice as long) and the window masks of the doubled
sequence (window_masks). Decoding with a KV cache refuses it. Cost: no parameters; each paired block's attention
scores cover the doubled sequence (describe_model counts them: the same window in blocks, twice the positions).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

import train_gpt  # train_gpt.attend at call time: tools/memory_plan.py stands a FlexAttention in for it
from train_gpt import (EOT_TOKEN, CausalSelfAttention, GroupedQueryAttention, HeadAttention, Hyperparameters,
                       SequenceMasks, check_head_pairs, kv_heads, norm, parse_layer_list)


@dataclass
class Flags:
    # paired-head attention (features/paired_heads.py; frontier recipe 3.4)
    paired_head_layers: str = ""  # blocks whose heads g, g+H/2 attend as one interleaved 2T sequence (r58; "" = off)


NO_KV_CACHE = "--paired_head_layers"  # the cache does not build the doubled sequence


def on(args: Hyperparameters) -> bool:
    return bool(args.paired_head_layers.strip())


def check(args: Hyperparameters, fail):
    """Blocks with attention, whose heads (and GQA's K/V heads) come in pairs (a paired block has no XSA or DC:
    features/xsa.py, dc.py check)."""
    try:
        paired = set(parse_layer_list(args.paired_head_layers))
    except ValueError:
        fail(f"--paired_head_layers={args.paired_head_layers!r}: expected comma-separated block indices such as "
             f"'0,2,5,9'")
    attention = set(range(args.num_layers)) - set(parse_layer_list(args.no_attn_layers))
    bad = sorted(paired - attention)
    if bad:
        fail(f"--paired_head_layers names blocks {bad} without attention; blocks with attention: "
             f"{','.join(map(str, sorted(attention)))}")
    if paired:
        check_head_pairs(args, "--paired_head_layers", fail)


def attention(args: Hyperparameters, max_seq_len: int, layer: int | None) -> HeadAttention | None:
    """A listed block's attention, paired; its rotary table covers the doubled sequence."""
    if layer is None or layer not in parse_layer_list(args.paired_head_layers):
        return None
    zero_proj = args.attn_proj_init == "zero"
    if kv_heads(args) != args.num_heads:
        return PairedGroupedQueryAttention(args.model_dim, args.num_heads, args.n_kv_heads, args.attn_scale,
                                           2 * max_seq_len, zero_proj=zero_proj)
    return PairedSelfAttention(args.model_dim, args.num_heads, args.attn_scale, 2 * max_seq_len, zero_proj=zero_proj)


def window_masks(args: Hyperparameters) -> dict:
    """The listed blocks read the masks of the doubled sequence, "paired_L" / "paired_S": 2T positions, position p
    in the document of token p // 2, causal and windowed in doubled positions (the same window in blocks covers half
    the tokens)."""
    blocks = tuple(sorted(set(parse_layer_list(args.paired_head_layers))))
    return dict(paired=SequenceMasks(blocks, paired_document_ids, positions_per_token=2)) if blocks else {}


def paired_rotary(rotary, x: Tensor) -> Tensor:
    """Rotary for paired heads (the record's r58): head h of token t at the phase of position 2t + (h mod 2); x (B,
    T, heads, head_dim), heads even, the rotary's table 2T long (any of the core's rotaries: its rotate)."""
    T, H = x.size(1), x.size(2)
    cos, sin = (table[:2 * T].view(T, 2, -1).repeat(1, H // 2, 1)[None] for table in (rotary.cos, rotary.sin))
    return rotary.rotate(x, cos, sin)


def paired_document_ids(inputs: Tensor) -> Tensor:
    """Document ids of the doubled sequence of --paired_head_layers: position p lies in token p // 2's document,
    i.e. document_ids(inputs).repeat_interleave(2), computed as a scan over the 2T positions (an EOT counts at its
    first one): inductor's CPU FlexAttention cannot lower a mask capturing a view of the token-level ids."""
    first = torch.arange(2 * len(inputs), device=inputs.device) % 2 == 0
    return ((inputs == EOT_TOKEN).repeat_interleave(2) & first).cumsum(0)


def interleave_pairs(x: Tensor) -> Tensor:
    """(B, T, heads, d) -> (B, 2T, heads/2, d), the record's reshape (r58): slot g's doubled sequence holds token t of
    head g at position 2t and of head g + heads/2 at 2t + 1 (--paired_head_layers)."""
    B, T, H, d = x.shape
    return x.reshape(B, 2 * T, H // 2, d)


def deinterleave_pairs(y: Tensor) -> Tensor:
    """The inverse of interleave_pairs: (B, 2T, heads/2, d) -> (B, T, heads, d)."""
    B, T2, P, d = y.shape
    return y.reshape(B, T2 // 2, 2 * P, d)


class PairedHeads(HeadAttention):
    """Paired-head attention (--paired_head_layers; frontier recipe 3.4, r58), mixed into multi-head or grouped-query
    attention (PairedSelfAttention, PairedGroupedQueryAttention: same parameters, same init). In the record's layout,
    heads g and g + H/2 form slot g's sequence of 2T positions, position 2t = token t of head g, 2t + 1 = token t of
    head g + H/2, for q, k and v alike (interleave_pairs, one reshape). Rotary turns head h of token t by the phase of
    position 2t + (h mod 2), as the record's rotary on its (T, H/2, 2 head_dim) view does: equal to the position for
    slots with g even, the two phases swapped for g odd (the record's (1, 4) stream at 6 heads); the rotary table is
    twice as long. The masks are the doubled ones of window_masks (document of position p = that of token p // 2,
    causal, the window counted in doubled positions: half the tokens); the output is de-interleaved. Each query thus
    sees both heads' keys of earlier tokens (and head g + H/2's query also head g's key of its own token) in one
    softmax. GQA pairs the K/V heads the same way: query slot g (heads g, g + H/2) reads K/V slot g // (H / n_kv_heads)
    (kv heads g // (H / n_kv_heads) and that + n_kv_heads/2, the K/V heads the two query heads read without pairing).

    The per-head hooks act on each head in token order outside the pairing: the key offset on the normed keys
    (rotary leaves the dims it shifts unrotated, so before or after rotary is the same), the value-embedding gate
    before interleaving, the output gate after de-interleaving. No XSA (features/xsa.py refuses it). Decoding
    with a KV cache is refused by GPT.hidden."""

    def rotate_mix_attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ve: Tensor | None, mask,
                          sources: dict | None) -> Tensor:
        B, T = q.shape[:2]
        q, k = self.scale_qk(self.lambdas, q, k)
        q, k = paired_rotary(self.rotary, norm(q)), paired_rotary(self.rotary, self.key_offset(norm(k)))
        v = self.values(x, v, ve)
        q, k, v = interleave_pairs(q), interleave_pairs(k), interleave_pairs(v)
        y = train_gpt.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.attn_scale)
        y = y.transpose(1, 2)
        y = self.out_gate(deinterleave_pairs(y), x, sources).reshape(B, T, -1)
        return self.scale_output(self.lambdas, self.c_proj(y))


class PairedSelfAttention(PairedHeads, CausalSelfAttention):
    """CausalSelfAttention with paired heads (PairedHeads)."""


class PairedGroupedQueryAttention(PairedHeads, GroupedQueryAttention):
    """GroupedQueryAttention with paired query heads and paired K/V heads (PairedHeads)."""
