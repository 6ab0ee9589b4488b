"""Untie (--untie_step; frontier recipe 3.2, record r51): the token embedding starts as the head's first vocab_size
rows and stays tied to them through Adam's update at that step, then trains on its own. Its sockets: the copy at
build time (install), Adam's step hooks (EmbeddingTie), the head's line in describe_model. Cost: no parameters; an
add and a copy of the embedding-sized rows per Adam update while tied.
"""
from dataclasses import dataclass

import torch

from train_gpt import GPT, Hyperparameters, total_steps


@dataclass
class Flags:
    # untie the embedding from the head (features/untie.py; frontier recipe 3.2)
    untie_step: int = 0  # embedding tied to the head's rows through Adam's update at this step, then its own (0: never)


def on(args: Hyperparameters) -> bool:
    return args.untie_step != 0


def check(args: Hyperparameters, fail):
    """--untie_step: an untie at an Adam step inside the run with a head to tie to."""
    if args.untie_step:
        if args.tie_embeddings or args.head_init_std <= 0:
            fail(f"--untie_step={args.untie_step} ties the embedding to a head drawn from N(0, head_init_std^2): it "
                 f"needs --head_init_std > 0 (frontier: 0.005; a zero head would zero the embedding) and no "
                 f"--tie_embeddings (always tied)")
        if not 0 < args.untie_step < total_steps(args) or (args.untie_step + 1) % args.adam_every:
            valid = [s for s in (args.untie_step - 1, args.untie_step + 1) if (s + 1) % args.adam_every == 0]
            fail(f"--untie_step={args.untie_step} must be a step at which Adam updates ((step + 1) % adam_every == "
                 f"0 with --adam_every={args.adam_every}) inside the run's {total_steps(args)} steps; e.g. "
                 f"{' or '.join(map(str, valid))}")


def install(model: GPT, args: Hyperparameters):
    """Tied at start: the embedding is the head's rows (EmbeddingTie keeps it so)."""
    if on(args):
        with torch.no_grad():
            model.embed.weight.copy_(model.lm_head.weight[:args.vocab_size])


def optimizer_hooks(model: GPT, adam, muon, args: Hyperparameters, world_size: int):
    if on(args):
        EmbeddingTie(model, adam, args)


def head_kind(args: Hyperparameters) -> str | None:
    return f"tied to the embedding until step {args.untie_step}" if on(args) else None


class EmbeddingTie:
    """--untie_step=N (frontier recipe 3.2, r51): the token embedding starts as the head's first vocab_size rows and
    stays tied to them through Adam's update at step N; after that update it receives a copy of the head's Adam
    state (moments and step count, the same rows) and trains on its own, in the "embed" Adam group.
    While tied, each Adam update adds the embedding's gradient to the head's rows (so the head learns from both
    uses), drops it, and copies the updated head rows back into the embedding. It works through Adam's step hooks
    and the head's Adam step count, which checkpoints carry, so the compile warm-up, --adam_every and resume need
    nothing else; the forward pass never changes (no recompile at the untie)."""

    def __init__(self, model: GPT, adam: torch.optim.Optimizer, args: Hyperparameters):
        self.embed, self.head, self.adam, self.rows = model.embed.weight, model.lm_head.weight, adam, args.vocab_size
        self.tied_updates = (args.untie_step + 1) // args.adam_every  # Adam updates 1..this one are tied
        self.done = None  # Adam updates so far; read from the head's Adam state after every (re)load
        adam.register_step_pre_hook(self.before_update)
        adam.register_step_post_hook(self.after_update)
        adam.register_load_state_dict_post_hook(self.forget_count)

    def forget_count(self, *_):
        self.done = None

    def updates_done(self) -> int:
        if self.done is None:  # one read (a device sync for fused Adam's tensor step) per start or load
            state = self.adam.state.get(self.head)
            self.done = int(state["step"]) if state else 0
        return self.done

    @torch.no_grad()
    def before_update(self, *_):
        if self.updates_done() < self.tied_updates and self.embed.grad is not None:
            self.head.grad[:self.rows] += self.embed.grad.to(self.head.grad.dtype)
            self.embed.grad = None

    @torch.no_grad()
    def after_update(self, *_):
        self.done = done = self.updates_done() + 1
        if done <= self.tied_updates:
            self.embed.copy_(self.head[:self.rows])
        if done == self.tied_updates:
            self.adam.state[self.embed] = {
                key: (value[:self.rows].clone() if torch.is_tensor(value) and value.shape == self.head.shape else
                      value.clone() if torch.is_tensor(value) else value)
                for key, value in self.adam.state[self.head].items()}
