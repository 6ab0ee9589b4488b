"""FP8 MLP (--fp8_mlp; frontier recipe 3.6, records r84, r87, r89): the dense relu^2 MLP's two matmuls in e4m3 in
training, on GPUs with FP8 matmuls (CUDA compute capability >= 8.9); validation, and training elsewhere, run the
plain MLP. Its sockets: the block's MLP (FP8MLP, the same parameters as the dense MLP), its placement (the FP8
switch), Muon hooks that refresh W2's delayed scale around each step (and share amax(p) across ranks), the
optional scaling buffers of checkpoints, a record line. Cost: no parameters; three scalar buffers per MLP; the two
MLP matmuls at FP8 throughput (unmeasured here: no FP8 GPU has run it yet).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from train_gpt import MLP, Hyperparameters, device_name, feature_hooks


@dataclass
class Flags:
    # FP8 MLP (features/fp8_mlp.py; frontier recipe 3.6)
    fp8_mlp: bool = False  # relu^2 MLP matmuls in FP8 (delayed scaling) in training where the GPU supports FP8


OPTIONAL_BUFFERS = ("p_amax", "w2_amax", "refreshes")  # FP8MLP's scaling state: dense checkpoints lack it


def on(args: Hyperparameters) -> bool:
    return args.fp8_mlp


def check(args: Hyperparameters, fail):
    """The dense relu^2 MLP only (not SwiGLU, nor a feature's MLP or factorized matrices), model_dim a multiple of
    16 (torch._scaled_mm)."""
    if not args.fp8_mlp:
        return
    replaced = [f"--mlp_act={args.mlp_act}"] if args.mlp_act != "relu2" else []
    replaced += [flag for replaces in feature_hooks("replaces_dense_mlp") if (flag := replaces(args))]
    if replaced:
        fail(f"--fp8_mlp runs the dense relu^2 MLP in FP8, not {replaced[0]}; drop those flags or pass "
             f"--fp8_mlp=false")
    if args.model_dim % 16:
        fail(f"--fp8_mlp needs model_dim a multiple of 16 (torch._scaled_mm); model_dim={args.model_dim}")


def mlp(args: Hyperparameters, layer: int | None):
    return FP8MLP(args) if args.fp8_mlp else None


def place(model, args: Hyperparameters, on_gpu: bool, fp8_matmuls: bool):
    for m in model.modules():
        if isinstance(m, FP8MLP):
            m.use_fp8 = args.fp8_mlp and fp8_matmuls


def optimizer_hooks(model, adam, muon, args: Hyperparameters, world_size: int):
    """W2 (c_proj, a Muon matrix) moves in Muon's step: refresh the delayed scales around it."""
    if not args.fp8_mlp:
        return
    fp8_mlps = [m for m in model.modules() if isinstance(m, FP8MLP)]  # found once, not every step
    muon.register_step_pre_hook(lambda *_: refresh_fp8_mlps(fp8_mlps))
    if world_size > 1:
        muon.register_step_post_hook(lambda *_: share_fp8_mlp_amax(fp8_mlps, world_size))


def log_header(log, run, args: Hyperparameters, env):
    if args.fp8_mlp and not any(m.use_fp8 for m in run.model.modules() if isinstance(m, FP8MLP)):
        log(f"--fp8_mlp: {device_name(env.device)} has no FP8 matmuls (needs CUDA compute capability >= 8.9); the "
            f"MLPs train without FP8 (in bf16 on a GPU)")


# --fp8_mlp (frontier recipe 3.6): the relu^2 MLP's two matmuls in e4m3 with per-tensor scales s (x_f8 = x / s,
# clamped to +-448, the largest e4m3 value). Up (r84): h and W1 at their current amax / 448. Down, delayed scaling
# (r89): p = relu(h W1^T)^2 at the previous training forward's amax(p) x 1.8 / 448; W2 at its amax at the
# previous refresh (optimizer step) x 1.12 / 448, or its current amax / 448 during the first 16 steps.
E4M3_MAX = 448.0
FP8_MIN_SCALE = torch.finfo(torch.float32).tiny  # an all-zero tensor (the zero-initialized W2) gets a finite scale
FP8_MLP_P_MARGIN, FP8_MLP_W2_MARGIN, FP8_MLP_W2_EXACT_STEPS = 1.8, 1.12, 16


def fp8_scale(amax: Tensor) -> Tensor:
    """The e4m3 scale that maps amax to 448 (fp32 scalar)."""
    return (amax.float() / E4M3_MAX).clamp_min(FP8_MIN_SCALE)


def _to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    # in fp32: rounding a bf16 t / scale to bf16 first would round twice (on CPU that moved y by 3.7%)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _to_e4m3_current(t: Tensor) -> tuple[Tensor, Tensor]:
    scale = fp8_scale(t.abs().amax())
    return _to_e4m3(t, scale), scale


def fp8_mlp_p_scale(p_amax: Tensor, p_amax_prev: Tensor) -> Tensor:
    """p's scale: the previous training forward's amax(p) x 1.8 / 448; the current amax / 448 when there is none
    (p_amax_prev = 0: the first forward)."""
    return fp8_scale(torch.where(p_amax_prev > 0, p_amax_prev * FP8_MLP_P_MARGIN, p_amax))


def _relu2_to_e4m3(pre: Tensor, p_amax_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    p = F.relu(pre).square()
    p_amax = p.amax().float()
    scale = fp8_mlp_p_scale(p_amax, p_amax_prev)
    return p, p_amax, scale, _to_e4m3(p, scale)


# Opaque to the model's torch.compile like fp8_mm, so on GPU the casts get their own fused kernels; eager on CPU.
_to_e4m3_current_compiled = torch.compile(_to_e4m3_current, dynamic=False)
_relu2_to_e4m3_compiled = torch.compile(_relu2_to_e4m3, dynamic=False)
_to_e4m3_compiled = torch.compile(_to_e4m3, dynamic=False)


def fp8_mlp_w2_scale(w2: Tensor, w2_amax_prev: Tensor, refreshes: Tensor) -> Tensor:
    """W2's scale: its amax at the previous refresh x 1.12 / 448 from step 16 on (refreshes = optimizer steps so
    far); before that, or with no previous amax, its current amax / 448."""
    amax = w2.detach().abs().amax()
    delayed = (refreshes >= FP8_MLP_W2_EXACT_STEPS) & (w2_amax_prev > 0)
    return fp8_scale(torch.where(delayed, w2_amax_prev * FP8_MLP_W2_MARGIN, amax))


@torch.library.custom_op("speedrun::fp8_mlp", mutates_args=())
def fp8_mlp(h: Tensor, w1: Tensor, w2: Tensor, p_amax_prev: Tensor,
            w2_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """relu(h W1^T)^2 W2^T for h (N, D), W1 (H, D), W2 (D, H), both matmuls e4m3 x e4m3 with fast accumulation into
    h's dtype (bf16 on GPU). Returns (y, p = relu^2 output in h's dtype, saved for the backward, amax(p))."""
    cuda = h.is_cuda
    h_f8, h_scale = (_to_e4m3_current_compiled if cuda else _to_e4m3_current)(h)
    w1_f8, w1_scale = (_to_e4m3_current_compiled if cuda else _to_e4m3_current)(w1)
    pre = torch._scaled_mm(h_f8, w1_f8.t(), scale_a=h_scale, scale_b=w1_scale, out_dtype=h.dtype,
                           use_fast_accum=True)
    p, p_amax, p_scale, p_f8 = (_relu2_to_e4m3_compiled if cuda else _relu2_to_e4m3)(pre, p_amax_prev)
    w2_f8 = (_to_e4m3_compiled if cuda else _to_e4m3)(w2, w2_scale)
    y = torch._scaled_mm(p_f8, w2_f8.t(), scale_a=p_scale, scale_b=w2_scale, out_dtype=h.dtype, use_fast_accum=True)
    return y, p, p_amax


@fp8_mlp.register_fake
def _(h, w1, w2, p_amax_prev, w2_scale):
    n = h.size(0)
    return h.new_empty(n, w2.size(0)), h.new_empty(n, w1.size(0)), h.new_empty((), dtype=torch.float32)


def _fp8_mlp_setup_context(ctx, inputs, output):
    h, w1, w2, _, _ = inputs
    ctx.save_for_backward(h, w1, w2, output[1])
    ctx.mark_non_differentiable(output[1], output[2])


def _fp8_mlp_backward(ctx, grad_y, *_):
    """Straight-through: the bf16 MLP's gradients at the saved h, W1, W2 and p, with relu(pre) = sqrt(p) (r87)."""
    h, w1, w2, p = ctx.saved_tensors
    grad_y = grad_y.type_as(h)
    grad_pre = (grad_y @ w2.type_as(h)) * (2 * p.sqrt())  # zero where pre <= 0, as relu's gradient
    grad_w2 = (grad_y.t() @ p).to(w2.dtype)
    grad_h = grad_pre @ w1.type_as(h)
    grad_w1 = (grad_pre.t() @ h).to(w1.dtype)
    return grad_h, grad_w1, grad_w2, None, None


fp8_mlp.register_autograd(_fp8_mlp_backward, setup_context=_fp8_mlp_setup_context)


class FP8MLP(MLP):
    """--fp8_mlp: the relu^2 MLP with both matmuls in FP8 (fp8_mlp) in training where main() sets use_fp8 (CUDA
    compute capability >= 8.9); validation, and training elsewhere, run MLP's path unchanged. Same parameters
    (c_fc.weight, c_proj.weight). Delayed-scaling state in persistent buffers, updated in place (no recompiles;
    checkpoints resume exactly): p_amax by each training forward, w2_amax and refreshes by refresh() before every
    optimizer step (a Muon hook, optimizer_hooks below)."""

    def __init__(self, args: Hyperparameters):
        super().__init__(args)
        self.use_fp8 = False
        self.register_buffer("p_amax", torch.zeros(()))  # amax(p) of the last training forward (0 = none yet)
        self.register_buffer("w2_amax", torch.zeros(()))  # amax(W2) at the last refresh (0 = none yet)
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64))  # optimizer steps taken

    def forward(self, x: Tensor) -> Tensor:
        if not (self.use_fp8 and self.training):
            return super().forward(x)
        w2 = self.c_proj.weight
        y, _, p_amax = fp8_mlp(x.flatten(0, -2), self.c_fc.weight, w2, self.p_amax,
                               fp8_mlp_w2_scale(w2, self.w2_amax, self.refreshes))
        with torch.no_grad():
            self.p_amax.copy_(p_amax)
        return y.view(*x.shape[:-1], -1)

    @torch.no_grad()
    def refresh(self):
        """Before an optimizer step: the weights the step's forwards quantized become the previous refresh."""
        self.w2_amax.copy_(self.c_proj.weight.abs().amax())
        self.refreshes += 1


def refresh_fp8_mlps(mlps: list):
    for m in mlps:
        m.refresh()


@torch.no_grad()
def share_fp8_mlp_amax(mlps: list, world_size: int):
    """After an optimizer step on several ranks: every rank takes the largest amax(p) of the ranks' last forwards,
    so the scaling state is the same on every rank (and rank 0's checkpoint resumes all of them exactly)."""
    if not mlps:
        return
    amax = torch.stack([m.p_amax for m in mlps])
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    for m, a in zip(mlps, amax):
        m.p_amax.copy_(a)
