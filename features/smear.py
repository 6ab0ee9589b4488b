"""--smear (frontier recipe 3.2, r34): on the raw token embeddings, e_t += lam sigmoid(w . e_t[:12]) e_(t-1), a
cheap one-token look-back before any attention. Its sockets: install (the core's identity on the raw embeddings
becomes the Smear; zero-initialized, so the core's random draw is unchanged), the Adam group "smear_gate" for w
(its LR from --adam_group_lr, bf16 under --param_dtype=record; lam is an Adam scalar). It reads the previous token,
so decoding with a KV cache refuses it. Cost: 13 parameters and elementwise work.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import Hyperparameters

LOOKS_BACK = "--smear"
SMALL_ADAM_GROUPS = ("smear_gate",)
RECORD_BF16_GROUPS = ("smear_gate",)


@dataclass
class Flags:
    # the smear (features/smear.py; frontier recipe 3.2)
    smear: bool = False  # e_t += lam * sigmoid(w . e_t[:12]) * e_(t-1) on the raw token embeddings (w, lam init 0)


def on(args: Hyperparameters) -> bool:
    return args.smear


def check(args: Hyperparameters, fail):
    if on(args) and args.model_dim < 12:
        fail(f"--smear reads the first 12 dims of the embedding; model_dim={args.model_dim}")


def install(model: nn.Module, args: Hyperparameters):
    if on(args):
        model.smear = Smear()


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    gates = [m.gate for m in model.modules() if isinstance(m, Smear)]
    return dict(smear_gate=gates) if gates else {}


class Smear(nn.Module):
    """--smear (frontier recipe 3.2, r34): on the raw token embeddings, e_t += lam sigmoid(w . e_t[:12]) e_(t-1)
    for t >= 1, across document boundaries like the recipe: a cheap one-token look-back before any attention.
    w (12) and lam start at zero, so the model starts unsmeared; both are Adam scalars."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(12))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, e: Tensor) -> Tensor:  # e (1, T, dim)
        gate = self.lam[0] * torch.sigmoid(F.linear(e[:, 1:, :12], self.gate[None].type_as(e)))  # (1, T-1, 1)
        return torch.cat([e[:, :1], e[:, 1:] + gate.type_as(e) * e[:, :-1]], dim=1)
