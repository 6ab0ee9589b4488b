"""Tied embeddings (--tie_embeddings; an architecture ablation, issue 6): the head reads the token-embedding table,
which grows to the head's 128-multiple rows. Its sockets: the token embedding (the padded table, drawn where the
core draws its own) and the head (TiedHead, no parameters of its own). Cost: the head's 38.6 M parameters at
full size are gone; the embedding gains 47 padding rows; the same head FLOPs.
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import Hyperparameters, next_multiple


@dataclass
class Flags:
    # tied embeddings (features/tied_embeddings.py)
    tie_embeddings: bool = False  # lm_head reads the token embedding table (x @ E^T / sqrt(model_dim))


def on(args: Hyperparameters) -> bool:
    return args.tie_embeddings


def embedding(args: Hyperparameters, dim: int) -> nn.Embedding | None:
    return nn.Embedding(next_multiple(args.vocab_size, 128), dim) if on(args) else None


def head(embed: nn.Embedding, args: Hyperparameters) -> nn.Module | None:
    return TiedHead(embed.weight) if on(args) else None


class TiedHead(nn.Module):
    """lm_head reading the token-embedding table E (--tie_embeddings; E is then padded to the head's 128-multiple
    rows): logits = x @ E^T / sqrt(dim). E keeps the embedding init N(0, 1), so with x RMS-normed the initial
    logits have unit std (the untied head starts at zero), and the fixed 1/sqrt(dim) keeps Adam at embed_lr from
    moving the logits much faster than the untied head at head_lr (0.6/sqrt(768) = 0.022 vs 0.008 per step).
    E is one parameter, owned by the Adam embedding group. Never FP8: N(0, 1) entries overflow the FP8 head scales."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # the same Parameter as GPT.embed.weight (model.parameters() lists it once)
        self.scale = weight.size(1) ** -0.5
        self.use_fp8 = False  # place_model sets it (as on the untied head); never FP8 (see above)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x)) * self.scale
