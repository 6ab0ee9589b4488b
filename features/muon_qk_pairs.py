"""Muon on Q and K per head pair (--muon_qk_pairs; frontier recipe 2.1 item 7, record r80): each head pair's
(2 head_dim) x dim slice of Q and of K is orthogonalized as its own matrix; V and the output projection stay whole.
Its socket: Muon's splits (muon_pieces cuts those parameters' updates into the slices). Cost: no parameters;
Newton-Schulz on (2 head_dim) x dim slices instead of dim x dim matrices: fewer FLOPs (at dim 768 and 6 heads about
a seventh for Q and K), in more, smaller products.
"""
from dataclasses import dataclass

import torch.nn as nn

from train_gpt import CausalSelfAttention, GroupedQueryAttention, Hyperparameters, check_head_pairs


@dataclass
class Flags:
    # Muon on Q and K per head pair (features/muon_qk_pairs.py; frontier recipe 2.1)
    muon_qk_pairs: bool = False  # Muon orthogonalizes Q and K per head pair ((2 head_dim) x dim slices; r80)


def on(args: Hyperparameters) -> bool:
    return args.muon_qk_pairs


def check(args: Hyperparameters, fail):
    if on(args):
        check_head_pairs(args, "--muon_qk_pairs", fail)


def muon_splits(model: nn.Module, args: Hyperparameters) -> dict:
    return qk_pair_splits(model.blocks) if on(args) else {}


def qk_pair_splits(model: nn.Module) -> dict:
    """--muon_qk_pairs (frontier recipe 2.1 item 7, r80): {parameter: muon_pieces split} so that Q and K of every
    multi-head or grouped-query attention are orthogonalized per head pair, each pair's (2 head_dim) x dim slice
    its own matrix; V (and O, its own parameter) stay whole."""
    splits = {}
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):  # qkv_w (3, dim, dim): Q and K are the first two
            splits[m.qkv_w] = (2, 2 * m.head_dim)
        elif isinstance(m, GroupedQueryAttention):  # q_w (dim, dim); kv_w (2, kv_dim, dim): K is the first
            splits[m.q_w] = splits[m.kv_w] = (1, 2 * m.head_dim)
    return splits
