"""--key_offset (frontier recipe 3.4, r49): on the long-window blocks the key dims that rotary leaves unrotated take
the previous token's values, so a head can match a query against the previous token's content with a position-free
score. Its socket: a hook of the block's attention (the keys after rotary). No parameters; it reads the previous
token, so decoding with a KV cache refuses it (LOOKS_BACK).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import Hyperparameters, Rotary, refuse_without_head_hooks, window_kinds

LOOKS_BACK = "--key_offset"


@dataclass
class Flags:
    # the key offset (features/key_offset.py; frontier recipe 3.4)
    key_offset: bool = False  # long-window layers: the unrotated key dims of token t are those of token t-1


def on(args: Hyperparameters) -> bool:
    return args.key_offset


def check(args: Hyperparameters, fail):
    if not on(args):
        return
    refuse_without_head_hooks(args, "--key_offset", fail)
    if args.rope != "half":
        fail("--key_offset shifts the key dims that rotary leaves unrotated; --rope=canonical rotates them all "
             "(use --rope=half)")


def head_hooks(attn: nn.Module, args: Hyperparameters, layer: int):
    if on(args) and window_kinds(args)[layer] == "L":
        attn.key_offset = KeyOffset(attn.rotary)


class KeyOffset(nn.Module):
    """--key_offset (frontier recipe 3.4, r49): for t >= 1 the key dims that rotary leaves unrotated (frequency
    zero) take token t-1's values, across documents like the recipe; token 0 keeps its own. A head can then match a
    query against the previous token's content with a position-free score: the shifted half of the key says "the
    token before me was ...". The dims come from the rotary module itself: with --rope=half our layout pairs dim i
    with dim i + head_dim/2 (chunked halves), and the upper half of the frequencies is zero, so at head_dim 128 the
    shifted dims are 32-63 and 96-127. The recipe rotates adjacent pairs and leaves dims 64-127 still: the same 32
    zero-frequency pairs (half the head), laid out differently."""

    def __init__(self, rotary: Rotary):
        super().__init__()
        still = rotary.frequencies() == 0
        self.register_buffer("shifted", torch.cat([still, still]), persistent=False)  # (head_dim,) bool

    def forward(self, k: Tensor) -> Tensor:  # k (B, T, heads, head_dim) after rotary
        previous = torch.cat([k[:, :1], k[:, :-1]], dim=1)
        return torch.where(self.shifted, previous, k)
