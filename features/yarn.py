"""YaRN (--yarn; frontier recipe section 1.4): with --stages, on each change of the long attention window the rotary
frequencies are rescaled for the new length and the softmax scale grows. Its sockets: each attention's rotary
(YarnRotary, the same shape as the core's) and a schedule that rewrites the rotary buffers in place when a step
enters a stage with a new long window (RotaryWindows: no recompiles). Cost: no parameters; one scalar multiply of q
and k per attention (the gain), and a recompute of the cos/sin tables at each window change.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import BLOCK_SIZE, Hyperparameters, Rotary, training_stages


@dataclass
class Flags:
    # YaRN (features/yarn.py; frontier recipe 1.4)
    yarn: bool = False  # stages: on each long-window change rescale rotary frequencies (YaRN), grow attn_scale


NEEDS = dict(yarn=("--stages (YaRN follows the stages' window changes)", lambda a: bool(a.stages)))


def on(args: Hyperparameters) -> bool:
    return args.yarn


def rotary(args: Hyperparameters, head_dim: int, max_seq_len: int, rotated: int) -> Rotary | None:
    return YarnRotary(head_dim, max_seq_len, rotated, canonical=args.rope == "canonical") if args.yarn else None


def schedule(model: nn.Module, args: Hyperparameters, device: torch.device):
    return RotaryWindows(model, args) if args.yarn else None


class YarnRotary(Rotary):
    """Rotary that follows the long attention window (--yarn, frontier recipe section 1.4). On each change of the
    long window from o to n tokens, frequency w_k becomes w_k (o/n + g_k (1 - o/n)) with g_k = clamp((r_k - 1) / 31,
    0, 1), r_k = o w_k / (2 pi): frequencies that turn many times inside the old window keep their value, slow ones
    are interpolated to the new length. The softmax scale grows by (1 + 0.2 ln(n/o)) per change; it is applied as
    a gain sqrt(growth) on both q and k, so attention keeps its fixed --attn_scale argument. set_windows() rewrites
    the buffers in place (a compiled graph reads the new values without recompiling)."""

    def __init__(self, head_dim: int, max_seq_len: int, rotated: int | None = None, canonical: bool = False):
        super().__init__(head_dim, max_seq_len, rotated, canonical)
        self.register_buffer("gain", torch.ones(()), persistent=False)

    @torch.no_grad()
    def set_windows(self, long_windows: list[int]):
        """Recompute from the initial frequencies for the sequence of long windows (tokens) seen so far."""
        freqs, growth = self.frequencies(), 1.0
        for old, new in zip(long_windows, long_windows[1:]):
            if new == old:
                continue
            turns = old * freqs / (2 * math.pi)
            keep = ((turns - 1) / 31).clamp(0, 1)
            freqs = freqs * (old / new + keep * (1 - old / new))
            growth *= 1 + 0.2 * math.log(new / old)
        theta = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), freqs).to(self.cos.device)
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())
        self.gain.fill_(growth ** 0.5)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return (super().rotate(x.float(), cos, sin) * self.gain).type_as(x)


def long_window_history(step: int, args: Hyperparameters) -> list[int]:
    """The long windows (tokens) of every stage up to the one holding `step`: what YaRN has adapted to."""
    stages = training_stages(args)
    return [st.long * BLOCK_SIZE for st in stages if st.start <= step]


class RotaryWindows:
    """--yarn: keeps every YarnRotary adapted to the long windows of the stages so far, updating the buffers in
    place when a step enters a stage with a new long window (and on resume or after the warm-up: set(step))."""

    def __init__(self, model: nn.Module, args: Hyperparameters):
        self.args, self.history = args, None
        self.rotaries = [m for m in model.modules() if isinstance(m, YarnRotary)]

    def set(self, step: int):
        if not self.rotaries:
            return
        history = long_window_history(step, self.args)
        if history != self.history:
            for rotary in self.rotaries:
                rotary.set_windows(history)
            self.history = history
