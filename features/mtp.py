"""Multi-token and prefix-token losses (frontier recipe 3.7: --mtp_weights r53, --prefix_weights r88): the
training loss also scores each position on the tokens after the next one and on the longest-proper-prefix token of
the next one, with per-stage weights that change linearly over a stage. Validation stays next-token CE. Its
sockets: the training loss (WeightedTokenLosses) and a schedule that writes the step's weights in place before
every step (LossSchedule). Cost: one log-sum-exp and one gather over the T x V logits whatever the number of terms.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from train_gpt import EOT_TOKEN, Hyperparameters, gpt2_encoding, total_steps, training_stages


@dataclass
class Flags:
    # multi-token and prefix-token losses (features/mtp.py; frontier recipe 3.7)
    mtp_weights: str = ""  # multi-token loss weights per stage "1,0.5,0.25-0;1,0.5-0;1" (targets t+1, t+2, ...)
    prefix_weights: str = ""  # prefix-token loss weight per stage "0.25;0.25-0;0" (a-b: linear over the stage)


def on(args: Hyperparameters) -> bool:
    return bool(args.mtp_weights or args.prefix_weights)


def check(args: Hyperparameters, fail):
    """Weight schedules with one entry per stage (the prefix loss one weight each)."""
    n_stages = len(weight_stage_spans(args))
    for flag in ("mtp_weights", "prefix_weights"):
        text = getattr(args, flag)
        if not text:
            continue
        try:
            entries = parse_stage_weights(text)
        except ValueError:
            fail(f"--{flag}={text!r}: expected per stage (';'-separated) comma-separated weights, each a or a-b "
                 f"(linear over the stage) with plain non-negative numbers, e.g. '1,0.5,0.25-0;1,0.5-0;1'")
        if len(entries) != n_stages or (flag == "prefix_weights" and max(map(len, entries)) > 1):
            fail(f"--{flag}={text!r} has {len(entries)} ';'-separated entries; the run has {n_stages} "
                 f"{'stages (--stages)' if args.stages else 'stage (no --stages)'}"
                 f"{' and the prefix loss takes one weight per stage' if flag == 'prefix_weights' else ''}")


def train_loss(args: Hyperparameters) -> nn.Module | None:
    if not on(args):
        return None
    num_targets = max(map(len, parse_stage_weights(args.mtp_weights))) if args.mtp_weights else 1
    return WeightedTokenLosses(num_targets, bool(args.prefix_weights), args.vocab_size)


def schedule(model: nn.Module, args: Hyperparameters, device: torch.device):
    return LossSchedule(model, args, device) if on(args) else None


class FutureTokenTerm(nn.Module):
    """Scores position t on the token `ahead` positions after the next, targets[t + ahead] (the token
    x_(t+1+ahead)), with the same logits; the last `ahead` positions have no such target in the sequence and are
    left out. Targets cross document boundaries, as in the recipe (3.7, r53). Returns (token index, valid)."""

    def __init__(self, ahead: int):
        super().__init__()
        self.ahead = ahead

    def forward(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.cat([targets[self.ahead:], targets.new_zeros(self.ahead)])
        return index, torch.arange(len(targets), device=targets.device) < len(targets) - self.ahead


def prefix_token_table(vocab_size: int) -> Tensor:
    """(vocab_size,) int64: for token y, the token whose bytes are the longest proper prefix of y's bytes (GPT-2
    BPE, from tiktoken), -1 where there is none (single bytes, EOT, ids past GPT-2's vocabulary, prefixes outside
    vocab_size). 50,000 of the 50,257 GPT-2 tokens have one; building it takes about 0.4 s on a CPU."""
    enc = gpt2_encoding()
    pieces = [enc.decode_single_token_bytes(t) for t in range(enc.n_vocab)]
    ids = {piece: t for t, piece in enumerate(pieces[:vocab_size]) if t != EOT_TOKEN}  # prefixes the head has
    table = torch.full((vocab_size,), -1, dtype=torch.long)
    for t, piece in enumerate(pieces[:vocab_size]):
        if t == EOT_TOKEN:
            continue
        table[t] = next((ids[piece[:n]] for n in range(len(piece) - 1, 0, -1) if piece[:n] in ids), -1)
    return table


class PrefixTokenTerm(nn.Module):
    """Scores position t on pi(y_t), pi(y) the longest-proper-prefix token of the next token y (frontier recipe
    3.7, r88): the head also learns how the next token's bytes begin. Positions whose y has no prefix token are
    left out. Returns (token index, valid)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("prefix", prefix_token_table(vocab_size), persistent=False)

    def forward(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        p = self.prefix[targets]
        return p.clamp(min=0), p >= 0


class WeightedTokenLosses(nn.Module):
    """--mtp_weights / --prefix_weights: loss = sum_i w_i sum_t NLL(token_i(t) | logits_t) / T over the terms (the
    next token, the tokens after it, the prefix token). Computed as sum_t (W_t lse_t - sum_i w_i logit_t[token_i])
    with W_t the weights of the terms valid at t: one log-sum-exp and one gather over the T x V logits, so the
    backward is one softmax pass and one scatter whatever the number of terms. The weights are a buffer that
    LossSchedule rewrites in place before every step (their stage schedule), so a compiled graph reads them as
    data and never recompiles when they change."""

    def __init__(self, num_targets: int, prefix: bool, vocab_size: int):
        super().__init__()
        terms = [FutureTokenTerm(k) for k in range(num_targets)] + ([PrefixTokenTerm(vocab_size)] if prefix else [])
        self.terms = nn.ModuleList(terms)
        self.register_buffer("weights", torch.zeros(len(terms)), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        pairs = [term(targets) for term in self.terms]
        index = torch.stack([i for i, _ in pairs], dim=1)  # (T, terms)
        weight = torch.stack([valid for _, valid in pairs], dim=1).to(logits.dtype) * self.weights
        lse = torch.logsumexp(logits, dim=-1)
        return ((weight.sum(1) * lse).sum() - (weight * logits.gather(1, index)).sum()) / len(targets)


@dataclass(frozen=True)
class TermWeight:
    """One loss term's weight over a stage: `start` at the stage's first step, `end` at its end, linear in between
    (equal for a constant weight)."""
    start: float
    end: float

    def at(self, frac: float) -> float:
        """The weight at a fraction of the stage (0 its start, 1 its end)."""
        return self.start + (self.end - self.start) * frac


StageWeights = tuple[TermWeight, ...]  # one stage's terms, in WeightedTokenLosses' order


def parse_stage_weights(text: str) -> tuple[StageWeights, ...]:
    """--mtp_weights / --prefix_weights: "1,0.5,0.25-0;1,0.5-0;1" -> per stage (';'), per term (','), its
    TermWeight; "a" is constant, "a-b" linear from a to b over the stage. ValueError when malformed."""
    return tuple(tuple(parse_term_weight(item) for item in entry.split(",")) for entry in text.split(";"))


def parse_term_weight(item: str) -> TermWeight:
    """One term of a stage, "a" or "a-b": plain non-negative numbers (no sign, inf or nan: a '-' separates the
    ends of a range)."""
    ends = [float(v) for v in item.strip().split("-")]
    if len(ends) not in (1, 2) or not all(0 <= v < math.inf for v in ends):
        raise ValueError(item)
    return TermWeight(ends[0], ends[-1])


def weight_stage_spans(args: Hyperparameters) -> list[tuple[int, int]]:
    """The (start, end) steps that the entries of --mtp_weights / --prefix_weights span: the scheduled stages of
    --stages (the extension steps keep the last entry's end value), or the whole run without --stages."""
    stages = training_stages(args)
    if not stages:
        return [(0, args.num_iterations)]
    return [(st.start, st.end) for st in stages[:len(args.stages.split(","))]]


def loss_weights(step: int, args: Hyperparameters) -> list[float]:
    """The training-loss weights at a step, in WeightedTokenLosses' term order: next token, the tokens after it
    (--mtp_weights; without it the next token alone at 1), then the prefix token (--prefix_weights)."""
    spans = weight_stage_spans(args)
    i = next((i for i, (_, end) in enumerate(spans) if step < end), None)
    frac = 1.0 if i is None else (step - spans[i][0]) / max(spans[i][1] - spans[i][0], 1)

    def at(text: str, width: int) -> list[float]:
        stage = parse_stage_weights(text)[len(spans) - 1 if i is None else i]
        return [term.at(frac) for term in stage] + [0.0] * (width - len(stage))  # terms a stage leaves out weigh 0
    future = at(args.mtp_weights, max(map(len, parse_stage_weights(args.mtp_weights)))) if args.mtp_weights else [1.0]
    return future + (at(args.prefix_weights, 1) if args.prefix_weights else [])


class LossSchedule:
    """--mtp_weights / --prefix_weights: before each step, that step's loss weights (loss_weights) are copied into
    the model's WeightedTokenLosses buffer in place, from a table made once on the device (no host sync)."""

    def __init__(self, model: nn.Module, args: Hyperparameters, device: torch.device):
        losses = [m for m in model.modules() if isinstance(m, WeightedTokenLosses)]
        self.buffer = losses[0].weights if losses else None
        self.table = None if not losses else torch.tensor(
            [loss_weights(step, args) for step in range(total_steps(args))], device=device)

    def set(self, step: int):
        if self.buffer is not None:
            self.buffer.copy_(self.table[min(step, len(self.table) - 1)])
