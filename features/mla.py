"""Multi-head latent attention (--mla_kv_rank > 0, DeepSeek-V2 style): keys and values from one cached low-rank
latent per token plus a rotary key part shared by the heads. Its socket: the block's attention. Cost: describe_model
counts its matrices and its KV cache (kv_rank + rope_dim floats per token and layer).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import train_gpt  # train_gpt.attend at call time: tools/memory_plan.py stands a FlexAttention in for it
from train_gpt import CastedLinear, Hyperparameters, Rotary, kv_heads, norm, rotary_offset, value_lambdas_r21


@dataclass
class Flags:
    # multi-head latent attention (features/mla.py)
    mla_kv_rank: int = 0  # multi-head latent attention when > 0: rank of the cached K/V latent (768-dim model: 256)
    mla_q_rank: int = 0  # MLA query latent rank (0 = queries straight from x; 768-dim model: 384)
    mla_rope_dim: int = 64  # MLA rotary dims per head, carried by one key part shared across heads


ATTENTION_NAME = "MLA (--mla_kv_rank > 0)"  # it has no per-head hooks (refuse_without_head_hooks)
NEEDS = dict(
    mla_q_rank=("--mla_kv_rank > 0", lambda a: a.mla_kv_rank > 0),
    mla_rope_dim=("--mla_kv_rank > 0", lambda a: a.mla_kv_rank > 0),
)


def on(args: Hyperparameters) -> bool:
    return args.mla_kv_rank > 0


def check(args: Hyperparameters, fail):
    if min(args.mla_kv_rank, args.mla_q_rank) < 0:
        fail("--mla_kv_rank and --mla_q_rank must be >= 0 (0 = off)")
    if args.mla_kv_rank > 0:
        if kv_heads(args) != args.num_heads:
            fail(f"--mla_kv_rank and --n_kv_heads={args.n_kv_heads} are alternatives (MLA already shares one latent "
                 f"across heads); keep n_kv_heads=0")
        if args.mla_rope_dim < 2 or args.mla_rope_dim % 2:
            fail(f"--mla_rope_dim={args.mla_rope_dim} must be even and >= 2 (rotary dims come in pairs)")
    elif args.mla_q_rank:
        fail(f"--mla_q_rank={args.mla_q_rank} needs --mla_kv_rank > 0 (MLA on)")


def attention(args: Hyperparameters, max_seq_len: int, layer: int | None) -> nn.Module | None:
    return LatentAttention(args, max_seq_len) if on(args) else None


class LowRankLinear(nn.Module):
    """x -> up(rms_norm(down(x))): a rank-`rank` bottleneck with a normed latent (MLA's query path)."""

    def __init__(self, in_features: int, rank: int, out_features: int):
        super().__init__()
        self.down = CastedLinear(in_features, rank)
        self.up = CastedLinear(rank, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(norm(self.down(x)))


class LatentAttention(nn.Module):
    """Multi-head latent attention (--mla_kv_rank > 0, DeepSeek-V2 style).

    Keys and values come from one RMS-normed kv_rank latent per token, plus one rope_dim rotary key part computed
    from x and shared by all heads, so a KV cache holds kv_rank + rope_dim floats per token and layer. Queries come
    from their own normed q_rank latent (or straight from x when mla_q_rank=0). Per head, q and k are
    [content (head_dim) | rotary (rope_dim)], RMS-normed together as in the baseline, then only the rotary part is
    rotated (all of its dims); values are head_dim wide and take the full-width value embedding as in the baseline.
    """

    def __init__(self, args: Hyperparameters, max_seq_len: int):
        super().__init__()
        dim, H, r, rank = args.model_dim, args.num_heads, args.mla_rope_dim, args.mla_kv_rank
        self.num_heads, self.head_dim, self.rope_dim, self.kv_rank = H, dim // H, r, rank
        self.attn_scale, self.qk_dim, self.v_dim = args.attn_scale, self.head_dim + r, self.head_dim
        q_out = H * self.qk_dim
        self.q_proj = LowRankLinear(dim, args.mla_q_rank, q_out) if args.mla_q_rank else CastedLinear(dim, q_out)
        self.kv_down = CastedLinear(dim, rank)  # x -> the cached latent
        self.k_rope = CastedLinear(dim, r)  # x -> the cached rotary key part, shared by all heads
        bound = 3 ** 0.5 * 0.5 * rank ** -0.5
        self.kv_up = nn.Parameter(torch.empty(2, dim, rank).uniform_(-bound, bound))  # latent -> k content, v
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0 * v + l1 * value_embedding
        self.rotary = Rotary(r, max_seq_len, rotated=r)
        self.c_proj = CastedLinear(dim, dim, zero_init=args.attn_proj_init == "zero")

    def forward(self, x: Tensor, ve: Tensor | None, mask, sources: dict | None = None) -> Tensor:
        B, T = x.shape[:2]  # sources: unused (MLA has no per-head hooks)
        H, hd, r = self.num_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, hd + r)
        latent = norm(self.kv_down(x))  # (B, T, kv_rank)
        kv = F.linear(latent, self.kv_up.flatten(end_dim=1).type_as(latent)).view(B, T, 2 * H, hd)
        k_content, v = kv.chunk(2, dim=-2)
        k = torch.cat([k_content, self.k_rope(x).view(B, T, 1, r).expand(B, T, H, r)], dim=-1)
        q, k = self.rope(norm(q), rotary_offset(mask)), self.rope(norm(k), rotary_offset(mask))
        v = value_lambdas_r21(self.lambdas, v, None if ve is None else ve.view_as(v))
        y = train_gpt.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.attn_scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def rope(self, x: Tensor, offset: int = 0) -> Tensor:  # (B, T, H, head_dim + rope_dim): rotate the rope part
        content, pos = x.split([self.head_dim, self.rope_dim], dim=-1)
        return torch.cat([content, self.rotary(pos, offset)], dim=-1)

    def kv_cache_floats_per_token(self) -> int:
        return self.kv_rank + self.rope_dim
