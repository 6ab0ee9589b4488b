"""Attention-input skips (--attn_input_skips src:dst; frontier recipe 3.3, record r77): block dst's attention reads
block src's output instead of its own residual (the recipe's blocks 8 and 9 read block 7's); its MLP still reads the
residual. Its socket: install swaps the listed blocks' attn_input (a PassThrough) for BlockOutput and keeps the
sources' outputs. Cost: no parameters, no FLOPs; block src's output is kept until block dst has read it.
"""
from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

from train_gpt import GPT, Hyperparameters, parse_layer_list, parse_skip_pairs


@dataclass
class Flags:
    # attention-input skips (features/attn_input_skips.py; frontier recipe 3.3)
    attn_input_skips: str = ""  # "src:dst,...": block dst's attention reads RMSNorm(block src's output) (r77: 7:8,7:9)


def on(args: Hyperparameters) -> bool:
    return bool(args.attn_input_skips.strip())


def check(args: Hyperparameters, fail):
    """--attn_input_skips: blocks that exist and have what the flag reads."""
    L = args.num_layers
    attention = set(range(L)) - set(parse_layer_list(args.no_attn_layers))
    try:
        inputs = parse_skip_pairs(args.attn_input_skips)
    except ValueError:
        fail(f"--attn_input_skips={args.attn_input_skips!r}: expected src:dst pairs such as '7:8,7:9'")
    bad = [f"{a}:{b}" for a, b in inputs if not (0 <= a < b < L and b in attention)]
    if bad:
        fail(f"--attn_input_skips {bad}: each src:dst needs 0 <= src < dst < num_layers={L} with attention in dst")
    if len({b for _, b in inputs}) != len(inputs):
        fail(f"--attn_input_skips={args.attn_input_skips!r} gives a block two attention inputs; one each")


def install(model: GPT, args: Hyperparameters):
    for src, dst in parse_skip_pairs(args.attn_input_skips):
        model.blocks[dst].attn_input = BlockOutput(src)
        model.kept_outputs.add(src)


class BlockOutput(nn.Module):
    """--attn_input_skips src:dst (frontier recipe 3.3, r77): block dst's attention reads block src's output, not
    its own residual (the recipe's layers 8, 9 read c7); its MLP still reads the residual."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, sources: dict) -> Tensor:
        return sources[self.block]
