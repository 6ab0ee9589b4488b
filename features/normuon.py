"""NorMuon (--normuon_beta2 > 0; frontier recipe section 2.1): Muon's orthogonalized update divided by an EMA of
its mean square per row (or column), then rescaled to its own norm, so only the balance between neurons changes. Its
socket: Muon's normalizer (called per piece of muon_pieces, with state in Muon's optimizer state). Cost: one value
per row or column of every Muon matrix (optimizer state), a mean, a divide and two norms per update.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from train_gpt import Hyperparameters


@dataclass
class Flags:
    # NorMuon (features/normuon.py; frontier recipe 2.1)
    normuon_beta2: float = 0.0  # NorMuon when > 0: per-row/column second-moment normalization of Muon's update


def on(args: Hyperparameters) -> bool:
    return args.normuon_beta2 > 0


def check(args: Hyperparameters, fail):
    if not 0 <= args.normuon_beta2 < 1:
        fail(f"--normuon_beta2={args.normuon_beta2} must be in [0, 1) (0 = off)")


def muon_normalizer(args: Hyperparameters):
    return NorMuon(args.normuon_beta2) if on(args) else None


def state_key(piece: int) -> str:
    """The optimizer-state key of NorMuon's v for piece `piece` of muon_pieces."""
    return "normuon_v" if piece == 0 else f"normuon_v{piece}"


class NorMuon:
    """NorMuon's normalization of orthogonalized updates (--normuon_beta2 > 0; frontier recipe section 2.1): an EMA
    v of the mean squared update per row (rows >= cols) or per column, no bias correction; the update is divided by
    sqrt(v) and rescaled to its original Frobenius norm, so only the balance between neurons changes."""

    def __init__(self, beta2: float):
        self.beta2 = beta2

    def __call__(self, X: Tensor, states: list[dict], piece: int = 0) -> Tensor:
        key = state_key(piece)
        X = X.float()  # (k, ..., rows, cols): the k updates this rank owns in a group (or one piece of them)
        rows, cols = X.shape[-2:]
        q = X.square().mean(dim=-1 if rows >= cols else -2, keepdim=True)
        v = torch.stack([s.setdefault(key, torch.zeros_like(q[0])) for s in states])
        v.lerp_(q, 1 - self.beta2)
        for s, v_i in zip(states, v):
            s[key].copy_(v_i)
        Y = X / v.clamp_min(1e-10).sqrt()
        # the clamp only matters for an all-zero update (a matrix behind a zero-initialized projection at step 0)
        return Y * (X.norm(dim=(-2, -1), keepdim=True) / Y.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))

    @staticmethod
    def state_shapes(pieces: list[Tensor]) -> dict:
        """v per piece of muon_pieces: one value per row or column of each of the piece's matrices (a stacked
        parameter's v is stacked too)."""
        shapes = {}
        for i, piece in enumerate(pieces):
            rows, cols = piece.shape[-2:]
            shapes[state_key(i)] = (*piece.shape[1:-2], *((rows, 1) if rows >= cols else (1, cols)))
        return shapes
