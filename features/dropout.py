"""Dropout (--dropout > 0; an architecture ablation, issue 6): dropout on the attention and MLP outputs of every
block, in training only. Its socket: install puts nn.Dropout in each block's dropout (an Identity in every kind of
block). Cost: no parameters; one mask draw and multiply per branch output in training.
"""
from dataclasses import dataclass

import torch.nn as nn

from train_gpt import GPT, Hyperparameters


@dataclass
class Flags:
    # dropout (features/dropout.py)
    dropout: float = 0.0  # dropout on the attention and MLP outputs (train only)


def on(args: Hyperparameters) -> bool:
    return args.dropout > 0


def check(args: Hyperparameters, fail):
    if not 0 <= args.dropout < 1:
        fail(f"--dropout={args.dropout} must be in [0, 1)")


def install(model: GPT, args: Hyperparameters):
    if on(args):
        for block in model.blocks:
            block.dropout = nn.Dropout(args.dropout)


def architecture_notes(args: Hyperparameters) -> list[str]:
    return [f"dropout {args.dropout}"]
