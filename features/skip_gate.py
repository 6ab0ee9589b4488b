"""Skip gate (--skip_gate; frontier recipe 3.3, records r32/r45): the U-net skip weights pass through a sigmoid, so
each skip's strength stays in (0, 1); the raw weights start at -1.5. Its socket: install puts SigmoidSkipWeights in
GPT's skip_gate (an Identity) and sets the weights' init in place. Cost: none (one sigmoid per skip weight).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import GPT, Hyperparameters


@dataclass
class Flags:
    # skip gate (features/skip_gate.py; frontier recipe 3.3)
    skip_gate: bool = False  # U-net skip weights pass through a sigmoid (logits init -1.5)


def on(args: Hyperparameters) -> bool:
    return args.skip_gate


def install(model: GPT, args: Hyperparameters):
    if on(args):
        model.skip_gate = SigmoidSkipWeights()
        with torch.no_grad():
            model.skip_weights.fill_(SigmoidSkipWeights.init)


class SigmoidSkipWeights(nn.Module):
    """--skip_gate (frontier recipe 3.3, r32/r45): the U-net skip weights pass through a sigmoid, so each skip's
    strength stays in (0, 1); the raw weights start at -1.5 (strength 0.18), the recipe's init for its skip."""
    init = -1.5

    def forward(self, w: Tensor) -> Tensor:
        return torch.sigmoid(w)
