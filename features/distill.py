"""Knowledge distillation (--teacher): the student's training loss blends its cross-entropy with the KL divergence
from a frozen teacher checkpoint (any configuration train_gpt.py can build), plus optionally a cosine loss between
final hidden states. Its socket: the trainee (what the loss is computed on) becomes a Distiller around the model;
validation sees the student alone. Cost: one teacher forward per micro-batch, measured after training and logged.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from train_gpt import (GPT, CastedLinear, Hyperparameters, build_model, checkpoint_model_args, count_params,
                       load_checkpoint, place_model, synchronize)


@dataclass
class Flags:
    # knowledge distillation from a frozen teacher checkpoint (features/distill.py)
    teacher: str = ""  # teacher checkpoint path ("" = no distillation)
    kd_alpha: float = 0.5  # loss = (1 - kd_alpha) * CE + kd_alpha * kd_temp^2 * KL(teacher_T || student_T)
    kd_temp: float = 2.0  # distillation temperature T
    kd_cosine: float = 0.0  # weight of 1 - cos(final hidden states), learned projection if widths differ


MIN_VALUES = dict(kd_temp=1e-6, kd_cosine=0.0)
UNIT_INTERVAL = ("kd_alpha",)
NEEDS = dict(
    kd_alpha=("--teacher", lambda a: bool(a.teacher)),
    kd_temp=("--teacher", lambda a: bool(a.teacher)),
    kd_cosine=("--teacher", lambda a: bool(a.teacher)),
)


def on(args: Hyperparameters) -> bool:
    return bool(args.teacher)


def check(args: Hyperparameters, fail):
    if (args.mtp_weights or args.prefix_weights) and args.teacher:
        fail("--mtp_weights/--prefix_weights with --teacher: distillation has its own loss (drop one of them)")


def check_inputs(args: Hyperparameters):
    if args.teacher:
        load_checkpoint(args.teacher, mmap=True)  # readable, not loaded


class Distiller(nn.Module):
    """Knowledge distillation: the student's training loss blends CE with KL(teacher_T || student_T) from a frozen
    teacher, plus optionally a cosine loss between final hidden states. Validation sees the student alone."""

    def __init__(self, student: GPT, teacher: GPT, args: Hyperparameters):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.alpha, self.temp, self.cosine = args.kd_alpha, args.kd_temp, args.kd_cosine
        s_dim, t_dim = student.embed.weight.shape[1], teacher.embed.weight.shape[1]
        self.proj = CastedLinear(s_dim, t_dim) if self.cosine > 0 and s_dim != t_dim else None
        teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (and never uses train-only noise such as dropout)
        return self

    def forward(self, inputs: Tensor, targets: Tensor | None = None, window_blocks=None) -> Tensor:
        if not self.training or targets is None:
            return self.student(inputs, targets, window_blocks)
        hidden = self.student.hidden(inputs, window_blocks)
        logits = self.student.logits(hidden)
        with torch.no_grad():
            t_hidden = self.teacher.hidden(inputs)  # the teacher's own (trained-for) full window
            t_logits = self.teacher.logits(t_hidden)
        loss = (1 - self.alpha) * F.cross_entropy(logits, targets) + self.student.aux_loss()
        if self.alpha:
            kl = F.kl_div(F.log_softmax(logits / self.temp, -1), F.log_softmax(t_logits / self.temp, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + self.alpha * self.temp ** 2 * kl
        if self.cosine:
            h = self.proj(hidden) if self.proj is not None else hidden
            loss = loss + self.cosine * (1 - F.cosine_similarity(h.float(), t_hidden.float(), dim=-1)).mean()
        return loss


def build_teacher(path: str, student: GPT, device: torch.device) -> GPT:
    ckpt = load_checkpoint(path)
    teacher_args = checkpoint_model_args(ckpt)  # a checkpoint mid --kron_progressive_every: the blocks it holds
    teacher = build_model(teacher_args)
    teacher.load_state_dict(ckpt["model"])
    if teacher.lm_head.weight.shape[0] != student.lm_head.weight.shape[0]:
        raise SystemExit(f"error: teacher vocabulary {teacher.lm_head.weight.shape[0]} and student vocabulary "
                         f"{student.lm_head.weight.shape[0]} differ; distillation needs the same one")
    return place_teacher(teacher, teacher_args, device).eval()


def place_teacher(teacher: GPT, teacher_args: Hyperparameters, device: torch.device) -> GPT:
    """The teacher placed as main() places a model of its own flags (train_gpt.place_model: on the device, bf16
    embeddings on GPU, its --param_dtype, its --fp8_head/--fp8_mlp switches), then one step of its own: on a GPU its
    remaining floating parameters in bf16 too. It never trains, so it needs no fp32 master weights, and its
    activations are bf16 on GPU anyway: half the memory. The FP8 switches act only in training (CastedLinear and
    FP8MLP take their plain path in eval), and the frozen teacher always runs in eval, so they never touch its
    forward."""
    place_model(teacher, teacher_args, device)
    if device.type == "cuda":  # place_model's on_gpu
        for p in teacher.parameters():
            if p.is_floating_point():
                p.data = p.data.bfloat16()
    return teacher


@torch.no_grad()
def teacher_cost_ms(teacher: GPT, inputs: Tensor, device: torch.device, repeats: int = 3) -> float:
    teacher(inputs)  # warm
    synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        teacher(inputs)
    synchronize(device)
    return 1000 * (time.perf_counter() - t) / repeats



def trainee(model: GPT, optimizers: list, args: Hyperparameters, env) -> nn.Module | None:
    """The Distiller the loss is computed on; its projection (--kd_cosine between different widths) trains with
    Adam at head_lr."""
    if not on(args):
        return None
    distiller = Distiller(model, build_teacher(args.teacher, model, env.device), args).to(env.device)
    if distiller.proj is not None:
        adam, muon = optimizers
        adam.add_param_group(dict(params=list(distiller.proj.parameters()), lr=args.head_lr, initial_lr=args.head_lr))
        if muon.grad_sync is not None:
            muon.grad_sync.add(list(distiller.proj.parameters()))
    return distiller


def log_header(log, run, args: Hyperparameters, env):
    if isinstance(run.trainee, Distiller):
        log(f"distillation: teacher {args.teacher} ({count_params(run.trainee.teacher):,} parameters), "
            f"kd_alpha {args.kd_alpha}, kd_temp {args.kd_temp}, kd_cosine {args.kd_cosine}")


def log_after_training(log, run, args: Hyperparameters, env, val_data: list):
    if isinstance(run.trainee, Distiller):
        cost = teacher_cost_ms(run.trainee.teacher, val_data[0][0][:args.seq_len], env.device)
        log(f"teacher forward: {cost:.1f}ms per {args.seq_len}-token micro-batch, "
            f"{args.micro_batches // env.world_size} per step per rank (measured after training; included in "
            f"train_time)")
