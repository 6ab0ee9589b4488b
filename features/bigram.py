"""The hashed bigram embedding with the sign trick (--bigram_rows; frontier recipe 3.2, r62 + r83): b_t = E[h_t] *
S[j_t], a zero-initialized table read at the hashed (previous, current) token pair times fixed signs, added at the
input as x = x0 + g b. Its sockets: install (into the core's input socket; no random draw: the table is zero and the
signs come from a fixed-seed generator), the value embeddings' Adam group for the table (as the recipe trains it),
its line in describe_model; with --mudd_gate_block g is a per-token gate (the core's gated socket) and the gated
blocks add b again. It reads the previous token, so decoding with a KV cache refuses it. Cost: rows x model_dim
parameters and a gather per token (no matrix FLOPs).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import Hyperparameters, LearnedAdd, ModelPart, built_by_feature, count_params

LOOKS_BACK = "--bigram_rows"


@dataclass
class Flags:
    # the hashed bigram embedding (features/bigram.py; frontier recipe 3.2)
    bigram_rows: int = 0  # hashed bigram embedding table rows (0 = off; recipe 377,280), added to x0 times g = 0.05


def on(args: Hyperparameters) -> bool:
    return args.bigram_rows > 0


def check(args: Hyperparameters, fail):
    if args.bigram_rows < 0 or args.bigram_rows == 1:
        fail(f"--bigram_rows={args.bigram_rows} must be 0 (off) or >= 2 (hashes take rows - 1 values, plus the "
             f"row of position 0)")


def install(model: nn.Module, args: Hyperparameters):
    """x = x0 + g b; a feature may weigh b per token (gated: --mudd_gate_block)."""
    if on(args):
        model.bigram = BigramHashEmbedding(args.bigram_rows, args.model_dim,
                                           built_by_feature("gated", "bigram", args, 0))


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """The table is an embedding that Adam trains like the value embeddings (frontier recipe 2.2)."""
    return dict(value_embeds=[model.bigram.table.weight]) if isinstance(model.bigram, BigramHashEmbedding) else {}


def model_parts(model: nn.Module, args: Hyperparameters) -> list:
    """The table and the gain (a gather: no matrix FLOPs)."""
    if not isinstance(model.bigram, BigramHashEmbedding):
        return []
    return [ModelPart("bigram hash", count_params(model.bigram), "bigram hash", 0)]


BIGRAM_SIGN_ROWS = 8192  # rows of the fixed sign table: j_t = (x_(t-1) XOR x_t) mod 8192


BIGRAM_SIGN_SEED = 20260520  # the sign trick's record date: any fixed seed gives every rank the same signs


def bigram_hash(inputs: Tensor, rows: int) -> Tensor:
    """Row of the bigram table for each position of one packed sequence (frontier recipe 3.2, r62): h_0 = rows-1,
    h_t = ((36313 x_t) XOR (27191 x_(t-1))) mod (rows - 1). The recipe computes in int32; int64 gives the same
    values for token ids below 2^31 / 36313 = 59,138 (GPT-2: 50,257) and no overflow beyond."""
    x = inputs.long()
    h = torch.bitwise_xor(36313 * x[1:], 27191 * x[:-1]) % (rows - 1)
    return torch.cat([h.new_full((1,), rows - 1), h])


def bigram_sign_index(inputs: Tensor) -> Tensor:
    """Row of the sign table per position (r83): j_0 = 0, j_t = (x_(t-1) XOR x_t) mod 8192."""
    x = inputs.long()
    return torch.cat([x.new_zeros(1), torch.bitwise_xor(x[:-1], x[1:]) % BIGRAM_SIGN_ROWS])


class BigramHashEmbedding(nn.Module):
    """--bigram_rows=B (frontier recipe 3.2, r62 + r83's sign trick): b_t = E[h_t] * S[j_t], a zero-initialized
    (B, dim) table E read at the hashed (previous, current) token pair, times fixed signs S in {+1, -1}^(8192 x dim)
    chosen by a second hash, so two pairs that collide in E usually see different sign patterns and their
    gradients partly cancel instead of adding up. Added at the input, x = x0 + g b with a learned scalar g (init
    0.05); with --mudd_gate_block g is a per-token gate and the gated blocks add b again (the recipe's every-layer
    injection, SublayerBlock). S is the sign of a Gaussian drawn from a fixed-seed CPU generator, so every rank
    builds the same S without a broadcast; it is kept in the state dict (int8) so a checkpoint always pairs E with
    the signs it was trained against."""

    def __init__(self, rows: int, dim: int, inject: nn.Module | None = None):
        super().__init__()
        self.rows = rows
        self.table = nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim))  # no random draw: zero-init
        draw = torch.randn(BIGRAM_SIGN_ROWS, dim, generator=torch.Generator().manual_seed(BIGRAM_SIGN_SEED))
        self.register_buffer("signs", torch.where(draw >= 0, 1, -1).to(torch.int8))
        self.inject = inject or LearnedAdd(0.05)  # x0 + g b: g learned, or GatedAdd (--mudd_gate_block)

    def forward(self, x0: Tensor, inputs: Tensor, sources: dict | None = None) -> Tensor:  # x0 (1, T, dim)
        b = self.table(bigram_hash(inputs, self.rows)) * self.signs[bigram_sign_index(inputs)].type_as(x0)
        if sources is not None:  # GPT.hidden's: b is what --mudd_block and the gated blocks mix in
            sources["bigram"] = b[None]
        return self.inject(x0, b[None], sources)
