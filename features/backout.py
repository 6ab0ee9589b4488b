"""Backout (--backout_layer=N; frontier recipe 3.3, record r40): before the final norm the residual gets lam times
block N's output, lam a learned scalar (init -0.5). Its socket: install puts Backout in GPT's backout (a PassThrough)
and keeps block N's output. Cost: one Adam scalar; one multiply-add over the residual.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import GPT, Hyperparameters


@dataclass
class Flags:
    # backout (features/backout.py; frontier recipe 3.3)
    backout_layer: int = -1  # x += lam * (output of this block) before the final norm, lam init -0.5 (-1 = off)


def on(args: Hyperparameters) -> bool:
    return args.backout_layer >= 0


def check(args: Hyperparameters, fail):
    if not -1 <= args.backout_layer < args.num_layers:
        fail(f"--backout_layer={args.backout_layer} must be a block in 0..{args.num_layers - 1} (or -1: off)")


def install(model: GPT, args: Hyperparameters):
    """In the socket GPT registered in its place, so the parameter order (and checkpoints) are the core's."""
    if on(args):
        model.backout = Backout(args.backout_layer)
        model.kept_outputs.add(args.backout_layer)


class Backout(nn.Module):
    """--backout_layer=N (frontier recipe 3.3, r40): before the final norm, x += lam * c_N with c_N the output of
    block N and lam a learned scalar (init -0.5, an Adam scalar): the head reads the late layers' contribution with
    part of the mid-depth residual taken back out. (MUDD, r81, later generalized this into its j=1 mix.)"""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.lam = nn.Parameter(torch.tensor([-0.5]))

    def forward(self, x: Tensor, outputs: dict) -> Tensor:
        return x + self.lam[0].type_as(x) * outputs[self.layer]
