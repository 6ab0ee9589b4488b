"""NEFTune (--neftune_alpha > 0; an architecture ablation, issue 6): train-time uniform noise on the token
embeddings, alpha / sqrt(T * dim) wide. Its socket: install puts NEFTune in GPT's embed_noise (an Identity).
Cost: no parameters; one uniform draw and add over the embeddings per training forward.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import GPT, Hyperparameters


@dataclass
class Flags:
    # NEFTune (features/neftune.py)
    neftune_alpha: float = 0.0  # NEFTune: train-time uniform noise * alpha / sqrt(seq_len * dim) on token embeddings


def on(args: Hyperparameters) -> bool:
    return args.neftune_alpha > 0


def check(args: Hyperparameters, fail):
    if args.neftune_alpha < 0:
        fail(f"--neftune_alpha={args.neftune_alpha} must be >= 0 (0 = off)")


def install(model: GPT, args: Hyperparameters):
    if on(args):
        model.embed_noise = NEFTune(args.neftune_alpha)


def architecture_notes(args: Hyperparameters) -> list[str]:
    return [f"neftune_alpha {args.neftune_alpha}"]


class NEFTune(nn.Module):
    """Train-time noise on the token embeddings (--neftune_alpha): uniform(-1, 1) * alpha / sqrt(T * dim), T the
    sequence length; identity in eval mode."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        bound = self.alpha / math.sqrt(x.size(-2) * x.size(-1))
        return x + torch.empty_like(x).uniform_(-bound, bound)
