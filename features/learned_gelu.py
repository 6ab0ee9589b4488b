"""--mlp_act=learned_gelu: the MLP's activation is GELU(scale * x + shift) with a learned per-channel scale (init 1,
so it starts as the plain GELU) and shift (init 0). The smallest feature, and README's worked example ("How to add
a feature"): a new value of a core flag and the one socket that builds its module. Its parameters are 1-D, so the
core's rule already trains them with the Adam scalars; its cost is 2 x hidden parameters per block and elementwise
work (describe_model counts no FLOPs for it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import Hyperparameters

MLP_ACTS = ("learned_gelu",)  # joins the core's --mlp_act values


def on(args: Hyperparameters) -> bool:
    return args.mlp_act == "learned_gelu"


def activation(name: str, width: int) -> nn.Module | None:
    return LearnedGELU(width) if name == "learned_gelu" else None


class LearnedGELU(nn.Module):
    """GELU(scale * x + shift) with a learned per-channel scale (init 1) and shift (init 0), trained by Adam."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x * self.scale.type_as(x) + self.shift.type_as(x))
