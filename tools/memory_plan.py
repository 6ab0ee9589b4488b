"""Memory plan before renting (issue 23 section 3): the per-GPU memory of a train_gpt.py run, on a CPU.

    python tools/preflight.py --plan --gpu=h100 --nproc 8 --flags="--preset=frontier"
    python tools/memory_plan.py --gpu=4090 --nproc 1                 # the same, without preflight

The model the flags describe is built on PyTorch's meta device (shapes and dtypes, no memory, no arithmetic), in
the dtypes tg.place_model gives it on a GPU (bf16 embeddings, --param_dtype=record's bf16 tensors) and with the
FP8 paths where the chosen GPU has FP8 matmuls (compute capability >= 8.9). Then, per GPU, for rank 0 (it owns
the most Muon matrices):

  exact (counted from the tensors train_gpt makes): parameters, buffers (rotary tables, ...), gradients (one per
    parameter the backward reaches, in its dtype; GradientSync all-reduces them in place, so no bucket copies),
    optimizer state (Adam's or CautiousAdam's moments; Muon's momentum and NorMuon's v for the matrices the rank
    owns, or for all of them once a checkpoint gathered them), tokens on the device, FlexAttention's BlockMasks
    (each mask the forward builds, made as flex_block_mask makes it on a GPU), compile_warmup's weight copy.
  measured, eager: one micro-batch's forward + backward at the run's own sequence length on the meta device,
    every tensor it makes tracked (LiveBytes, a TorchDispatchMode) and every tensor autograd saves counted
    (saved_tensors_hooks). The attention goes through a stand-in that saves what FlexAttention saves (q, k, v,
    out, fp32 row statistics: no T x T matrix) and allocates what its backward allocates; the CPU path's dense
    masks are never counted. Likewise the optimizer step and the validation forward (no_grad, --val_seq_len).
    On real CPU tensors the same measurement gives the same bytes (tests/tools/test_memory_plan.py). This is eager
    PyTorch's memory, an upper bound for the compiled run: inductor fuses pointwise chains and recomputes cheap
    ops instead of saving them, above all the head's fp32 softcap and loss chain (several T x vocab copies).
  estimated (labelled): the usable share of a GPU's memory, the CUDA context, NCCL's buffers, and a compiled
    estimate: the eager peak with its vocabulary-wide tensors replaced by what any compiled graph of this code
    must keep (the head's bf16 output and its bf16 gradient, plus the FP8 head's e5m2 gradient copy).

Peak = model state + the largest of (a training micro-step per stage, the optimizer step, a validation forward)
+ CUDA context + NCCL. Prints a table, a verdict (fits | fits_if_compiled | does_not_fit), the accumulation, the
sequence split under which even the eager peak fits when it does not, the torchrun command, and one
`plan: {json}` line (bytes). Exit code 0 when the plan fits (eager, or by the compiled estimate), 1 when it does
not, 2 for bad arguments.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_SHARED_TIKTOKEN = ROOT.parent / "shared" / "tiktoken_cache"  # the prefix-token loss and --mot read GPT-2's BPE
if _SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED_TIKTOKEN))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import features.cautious_adam as cautious_adam_feature  # noqa: E402
import features.fp8_mlp as fp8_mlp_feature  # noqa: E402
import train_gpt as tg  # noqa: E402

GiB = 2 ** 30


@dataclass(frozen=True)
class Gpu:
    model: str
    nominal_gb: int  # as sold; the memory is binary-sized, so this many GiB are on the board
    capability: tuple  # CUDA compute capability: FP8 matmuls (the FP8 head and MLPs) from (8, 9)


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB", 80, (9, 0)),
    "h200": Gpu("NVIDIA H200 141GB", 141, (9, 0)),
    "a100-40": Gpu("NVIDIA A100 40GB", 40, (8, 0)),
    "a100-80": Gpu("NVIDIA A100 80GB", 80, (8, 0)),
    "l40s": Gpu("NVIDIA L40S 48GB", 48, (8, 9)),
    "4090": Gpu("NVIDIA GeForce RTX 4090 24GB", 24, (8, 9)),
}
# Estimate: the driver reports 94-99.6% of the nominal GiB (ECC and reserved pages: an L40S with ECC on shows 45 of
# its 48), and PyTorch's caching allocator loses a few percent more to fragmentation. The CUDA context is a row of
# its own, so it is not part of this margin.
USABLE_FRACTION = 0.93
# Estimate: the CUDA context with cuBLAS handles and the loaded kernels' code, typically 0.3-1 GiB per process.
CUDA_CONTEXT_BYTES = GiB // 2
# Estimate: NCCL's communicator buffers with peers (4 MiB per protocol, channel and peer by default, NCCL_BUFFSIZE;
# more with NVLink SHARP on NVSwitch systems). None for a world of one: Muon and GradientSync skip collectives.
NCCL_BYTES = GiB
NO_CHECKPOINT_HINT = "--save_every > 0 or --resume"


def gpu_spec(name: str) -> Gpu:
    if name not in GPUS:
        raise SystemExit(f"error: --gpu={name!r} is not a GPU this plan knows; valid: {', '.join(GPUS)}")
    return GPUS[name]


def usable_bytes(gpu: Gpu) -> int:
    return int(gpu.nominal_gb * GiB * USABLE_FRACTION)


def has_fp8(gpu: Gpu) -> bool:
    return gpu.capability >= (8, 9)


# -----------------------------------------------------------------------------------------------------------------
# The model as the GPU holds it, on the meta device


def storage_key(t: torch.Tensor) -> int:
    """Identifies t's storage (views share it) on any device; meta tensors have no data pointer to compare."""
    return t.untyped_storage()._cdata


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def meta_model(args: tg.Hyperparameters, gpu: Gpu) -> tg.GPT:
    """The model main() trains (at step 0: --kron_progressive_every swaps blocks later), on the meta device."""
    model = tg.meta_model(dataclasses.replace(args, weight_init="uniform"), step=0)  # the draw needs values
    # .to: tables a module loads from disk (the --mot byte table) arrive on the CPU whatever the default device
    return tg.set_gpu_dtypes(model.to("meta"), args, on_gpu=True, fp8_matmuls=has_fp8(gpu))


def window_tensors(window, device) -> torch.Tensor | tuple:
    """The forward's window argument as main() passes it (WindowTensors: int32 tensors)."""
    make = lambda n: torch.tensor(n, dtype=torch.int32, device=device)
    return tuple(map(make, window)) if isinstance(window, tuple) else make(window)


# -----------------------------------------------------------------------------------------------------------------
# Exact counts: parameters, buffers, gradients, optimizer state, data, masks


def adam_state_bytes(adam: torch.optim.Optimizer, params_with_grads: set, tied: dict | None = None) -> int:
    """Adam keeps two moments per parameter that gets a gradient. CautiousAdam: fp32 moments, a Python step count.
    torch's Adam (fused on CUDA): moments in the parameter's dtype (zeros_like) and a fp32 step tensor on the device.
    tied: {id(embedding): head} under --untie_step: EmbeddingTie gives the embedding a copy of the head's state rows
    when it unties (counted: the later, larger case), so torch's Adam keeps those in the head's dtype."""
    total, tied = 0, tied or {}
    for group in adam.param_groups:
        for p in group["params"]:
            if id(p) not in params_with_grads:
                continue
            if isinstance(adam, cautious_adam_feature.CautiousAdam):
                total += 2 * p.numel() * 4
            else:
                total += 2 * p.numel() * tied.get(id(p), p).element_size() + 4
    return total


def muon_state_bytes(muon: tg.Muon, whole: bool) -> tuple[int, int, int]:
    """(bytes, matrices held, matrices in all) of Muon's state on its rank: momentum (zeros_like: the parameter's
    dtype) and NorMuon's fp32 v (Muon.state_shapes) for the parameters the rank owns, or for every parameter once
    Muon.gather_momentum has run (a checkpoint) or a checkpoint was loaded (--resume): it then keeps them all."""
    total = held = count = 0
    for group in muon.param_groups:
        params = group["params"]
        mine = params if whole else muon.owned(params)
        count, held = count + len(params), held + len(mine)
        for p in mine:
            for key, shape in muon.state_shapes(p, group.get("split", ())).items():
                element = p.element_size() if key == "momentum_buffer" else 4
                total += element * int(torch.Size(shape).numel())
    return total, held, count


def data_bytes(args: tg.Hyperparameters, nproc: int) -> int:
    """Token tensors on the device: the validation set, loaded once (val_batches: int32 inputs, int64 targets of
    val_tokens / nproc tokens), and two steps' training batches (the next one arrives while the last is still
    referenced): micro_batches / nproc sequences of the longest stage."""
    val_steps = args.val_tokens // (nproc * args.val_seq_len)
    longest = max([st.seq_len for st in tg.training_stages(args)] or [args.seq_len])
    return 12 * val_steps * args.val_seq_len + 2 * 12 * (args.micro_batches // nproc) * longest


def block_mask_bytes(mask: BlockMask) -> int:
    """The BlockMask's index tensors and the tensors its mask_mod reads (the document ids; windows are tiny)."""
    tensors = [t for t in mask.as_tuple() if isinstance(t, torch.Tensor)]
    for cell in mask.mask_mod.__closure__ or ():
        if isinstance(cell.cell_contents, torch.Tensor):
            tensors.append(cell.cell_contents)
    return unique_bytes(tensors)


# -----------------------------------------------------------------------------------------------------------------
# Measurements on the meta device


class LiveBytes(TorchDispatchMode):
    """Tracks every storage an aten op creates while active (weak references, so a freed one stops counting) and
    the peak of their total. Storages that existed before (`existing`: parameters, gradients, inputs) never count;
    in-place ops and views create none. Only the moments just after an allocation can be peaks, so the frees are
    swept then. `logits_at_peak`: the part of the peak in tensors whose last dim is one of `logit_dims` (the
    vocabulary, padded or not): the head's logits and their softcap / loss chain, which torch.compile fuses."""

    def __init__(self, existing: set, logit_dims: tuple = ()):
        super().__init__()
        self.existing, self.logit_dims, self.live, self.peak, self.logits_at_peak = existing, logit_dims, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = storage_key(t)
                if key not in self.existing and key not in self.live:
                    logit = t.ndim > 0 and t.size(-1) in self.logit_dims
                    new[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes(), logit)
        if new:
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.live.update(new)
            total = sum(n for _, n, _ in self.live.values())
            if total > self.peak:
                self.peak, self.logits_at_peak = total, sum(n for _, n, logit in self.live.values() if logit)
        return out


def laid_out_like(q: torch.Tensor, last: int) -> torch.Tensor:
    """An empty tensor of q's shape with last dim `last`, in q's memory order (FlexAttention's output follows its
    query's layout, so the model's transpose back to (B, T, heads, dim) is a view, not a copy)."""
    order = sorted(range(q.ndim), key=lambda d: -q.stride(d))
    shape = [*q.shape[:-1], last]
    empty = q.new_empty([shape[d] for d in order])
    return empty.permute([order.index(d) for d in range(q.ndim)])


class FlexAttentionStandIn(torch.autograd.Function):
    """Computes attention with the CPU path's SDPA and dense mask, but saves for backward what FlexAttention saves
    (torch 2.13's FlexAttentionAutogradOp: q, k, v, out, and the fp32 log-sum-exp and row maxima (B, heads, T);
    the BlockMask's tensors too, counted as masks) and allocates what its backward allocates (dq, dk, dv, and the
    fp32 row sums delta), so the tracked memory is the GPU path's. The SDPA itself runs untracked: a fused
    FlexAttention kernel never materializes its T x T scores."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out = laid_out_like(q, v.size(-1))
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        max_scores = q.new_empty(q.shape[:-1], dtype=torch.float32)
        with _disable_current_modes():
            out.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                     enable_gqa=k.size(1) != q.size(1)))
        ctx.save_for_backward(q, k, v, out, logsumexp, max_scores)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp, max_scores = ctx.saved_tensors
        delta = torch.empty_like(logsumexp)  # noqa: F841 (allocated for LiveBytes: flex's backward holds it)
        grads = laid_out_like(q, q.size(-1)), laid_out_like(k, k.size(-1)), laid_out_like(v, v.size(-1))
        with _disable_current_modes(), torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            y = F.scaled_dot_product_attention(*leaves, attn_mask=ctx.mask, scale=ctx.scale,
                                               enable_gqa=k.size(1) != q.size(1))
            for g, value in zip(grads, torch.autograd.grad(y, leaves, grad_out)):
                g.copy_(value)
        return *grads, None, None


def attend_like_flex(q, k, v, mask, scale):
    if isinstance(mask, tg.KVCacheWindow):  # decoding (tools/sample.py), never in training
        return mask.attend(q, k, v, scale)
    return FlexAttentionStandIn.apply(q, k, v, mask, scale)


@contextlib.contextmanager
def gpu_attention(masks_built: list):
    """While active: train_gpt's attention goes through FlexAttentionStandIn, and every dense mask the CPU path
    builds is made untracked, its BlockMask twin (what the GPU builds from the same arguments) appended to
    masks_built as bytes."""
    dense, dense_token = tg.dense_attention_mask, tg.dense_token_window_mask
    flex_on_cpu, tg.FLEX_ATTENTION_ON_CPU = tg.FLEX_ATTENTION_ON_CPU, False  # the dense path, whatever a test set

    def attention_mask(inputs, window_blocks, docs=None, halvings=0, unit="block"):
        with _disable_current_modes():
            masks_built.append(block_mask_bytes(tg.flex_block_mask(inputs, window_blocks, docs, halvings, unit)))
            return dense(inputs, window_blocks, docs, halvings, unit)

    def token_window_mask(inputs, tokens):
        with _disable_current_modes():
            masks_built.append(block_mask_bytes(tg.flex_token_window_mask(inputs, tokens)))
            return dense_token(inputs, tokens)

    saved = tg.attend, tg.dense_attention_mask, tg.dense_token_window_mask
    tg.attend, tg.dense_attention_mask, tg.dense_token_window_mask = attend_like_flex, attention_mask, \
        token_window_mask
    try:
        yield
    finally:
        tg.attend, tg.dense_attention_mask, tg.dense_token_window_mask = saved
        tg.FLEX_ATTENTION_ON_CPU = flex_on_cpu


@dataclass
class StepMemory:
    saved: int  # bytes autograd saved for backward (unique storages, parameters and inputs excluded)
    peak: int  # peak bytes of the tensors the pass made (saved ones included), over the state it started from
    masks: int  # bytes of the BlockMasks the GPU builds for this forward
    logits_at_peak: int  # the part of `peak` in vocabulary-wide tensors (LiveBytes.logits_at_peak)
    reached: frozenset = frozenset()  # names of the parameters the backward gave a gradient


def logit_dims(model: tg.GPT) -> tuple:
    return model.vocab_size, tg.next_multiple(model.vocab_size, 128)


def model_storages(model: nn.Module) -> set:
    return {storage_key(t) for t in [*model.parameters(), *model.buffers()]}


def tokens(n: int, device) -> torch.Tensor:
    """n + 1 token ids, one document (no EOT): memory does not depend on the tokens or the documents."""
    return torch.ones(n + 1, dtype=torch.int64, device=device)


def micro_step_memory(model: tg.GPT, seq_len: int, window) -> StepMemory:
    """One training micro-batch of seq_len tokens, forward and backward, as from the second micro-batch of a step
    on: every gradient exists already (AccumulateGrad adds into it in place), so `peak` is all activation and
    temporary memory."""
    device = next(model.parameters()).device
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    ids, masks_built, saved = tokens(seq_len, device), [], {}
    inputs, targets = ids[:-1].int(), ids[1:]
    existing = model_storages(model) | {storage_key(p.grad) for p in model.parameters() if p.grad is not None} | {
        storage_key(t) for t in (ids, inputs, *(window if isinstance(window, tuple) else (window,)))}

    def pack(t):
        key = storage_key(t)
        if key not in existing:
            saved[key] = t.untyped_storage().nbytes()
        return t

    names, reached = {id(p): name for name, p in model.named_parameters()}, set()
    hooks = [p.register_post_accumulate_grad_hook(lambda p: reached.add(names[id(p)]))
             for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        with gpu_attention(masks_built), LiveBytes(existing, logit_dims(model)) as live:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(inputs, targets, window)
            loss.backward()
            del loss
    finally:
        for hook in hooks:
            hook.remove()
    return StepMemory(sum(saved.values()), live.peak, sum(masks_built), live.logits_at_peak, frozenset(reached))


def validation_memory(model: tg.GPT, val_seq_len: int, window) -> StepMemory:
    """evaluate()'s forward of one val_seq_len-token sequence (no_grad; the head in chunks of the longest training
    sequence, GPT.eval_chunk_tokens)."""
    device = next(model.parameters()).device
    ids, masks_built = tokens(val_seq_len, device), []
    inputs, targets = ids[:-1].int(), ids[1:]
    existing = model_storages(model) | {storage_key(t) for t in (ids, inputs)}
    model.eval()
    try:
        with gpu_attention(masks_built), LiveBytes(existing, logit_dims(model)) as live, torch.no_grad():
            model(inputs, targets, window)
    finally:
        model.train()
    return StepMemory(0, live.peak, sum(masks_built), live.logits_at_peak)


class _Done:
    def wait(self):
        return None


@contextlib.contextmanager
def collectives_in_place():
    """Muon's all_gather and the FP8 / MoE all_reduces without a process group: shape-true, values untouched, so a
    rank's optimizer step runs (and allocates) as it would among world_size ranks."""
    saved = dist.all_gather_into_tensor, dist.all_reduce
    dist.all_gather_into_tensor = lambda out, inp, async_op=False, **kw: _Done() if async_op else None
    dist.all_reduce = lambda t, op=None, async_op=False, **kw: _Done() if async_op else None
    try:
        yield
    finally:
        dist.all_gather_into_tensor, dist.all_reduce = saved


def optimizer_step_memory(model: tg.GPT, optimizers: list) -> int:
    """Peak bytes an optimizer step makes (train_step's order: Muon, then Adam), over parameters, gradients and
    states: a first step creates the states untracked, the second is measured. Measured with the CPU path's fp32
    Newton-Schulz and unfused Adam (on GPU: bf16 Newton-Schulz, fused Adam), so an upper bound."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    order = sorted(optimizers, key=lambda o: not isinstance(o, tg.Muon))
    with collectives_in_place():
        for opt in order:
            opt.step()
        existing = model_storages(model) | {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
        existing |= {storage_key(t) for opt in optimizers for state in opt.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor)}
        with LiveBytes(existing) as live:
            for opt in order:
                opt.step()
    return live.peak


# -----------------------------------------------------------------------------------------------------------------
# The plan


def stage_lengths(args: tg.Hyperparameters) -> list[tuple[str, int, object]]:
    """(name, seq_len, window) of each stage (one for #21's schedule); the window at the stage's first step."""
    stages = tg.training_stages(args)
    if not stages:
        return [("all steps", args.seq_len, tg.window_at(tg.total_steps(args), args))]
    names = [str(i + 1) for i in range(len(stages))]
    if args.extension_steps:
        names[-1] = "ext"
    return [(f"stage {name}", st.seq_len, tg.window_at(st.start, args)) for name, st in zip(names, stages)]


def warmup_snapshot_bytes(model: tg.GPT, args: tg.Hyperparameters, opt_state: int) -> int:
    """compile_warmup deep-copies the state dict (parameters, persistent buffers; tied tensors once) and the
    optimizer states, on the device, for the whole warm-up (compiled runs on a GPU: --compile, --warmup_steps > 0).
    The optimizer states are empty then unless a checkpoint was loaded (--resume)."""
    if not (args.compile and args.warmup_steps > 0):
        return 0
    return unique_bytes(model.state_dict().values()) + (opt_state if args.resume else 0)


def plan_memory(args: tg.Hyperparameters, gpu: Gpu, nproc: int, cache: dict | None = None) -> dict:
    """Every number of the plan for these (validated) args on nproc x gpu, bytes per GPU of rank 0. cache: reuse
    the measurements of an earlier call (the same model and GPU) by sequence length."""
    cache = {} if cache is None else cache
    model = meta_model(args, gpu)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = unique_bytes(model.buffers())

    stages = []
    for name, seq_len, window in stage_lengths(args):
        key = ("train", seq_len)
        if key not in cache:
            cache[key] = micro_step_memory(model, seq_len, window_tensors(window, "meta"))
        m = cache[key]
        stages.append(dict(name=name, seq_len=seq_len, saved=m.saved, peak=m.peak, masks=m.masks,
                           logits_at_peak=m.logits_at_peak))
    reached = set().union(*(cache[("train", st["seq_len"])].reached for st in stages))
    with_grads = {id(p) for name, p in model.named_parameters() if name in reached}
    grad_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in with_grads)

    adam, muon = tg.build_optimizers(model, args, rank=0, world_size=nproc)
    whole = args.save_every > 0 or bool(args.resume)
    muon_bytes, muon_held, muon_count = muon_state_bytes(muon, whole)
    tied = {id(model.embed.weight): model.lm_head.weight} if args.untie_step else {}
    adam_bytes = adam_state_bytes(adam, with_grads, tied)
    opt_state = adam_bytes + muon_bytes
    key = ("optimizer", nproc)
    if key not in cache:
        cache[key] = optimizer_step_memory(model, [adam, muon])
    opt_step = cache[key]
    adam_grads = sum(p.numel() * p.element_size() for g in adam.param_groups for p in g["params"]
                     if id(p) in with_grads)

    key = ("val", args.val_seq_len, model.eval_chunk_tokens)
    if key not in cache:
        cache[key] = validation_memory(model, args.val_seq_len, window_tensors(tg.window_at(
            tg.total_steps(args), args, final=True), "meta"))
    validation = cache[key]

    snapshot = warmup_snapshot_bytes(model, args, opt_state)
    data = data_bytes(args, nproc)
    state = param_bytes + buffer_bytes + grad_bytes + opt_state + data + snapshot
    # between steps only the gradients of an Adam still accumulating (--adam_every > 1) are held
    held_between_steps = adam_grads if args.adam_every > 1 else 0
    vocab = tg.next_multiple(args.vocab_size, 128)  # the head's output width
    # phase -> (eager bytes, compiled estimate): the estimate swaps the eager peak's vocabulary-wide tensors (the
    # head's fp32 softcap and loss chain, several T x V copies) for the least any compiled graph of this code keeps:
    # the head's bf16 output (the matmul is not recomputed) and in training its bf16 gradient, which the head's
    # backward reads (the FP8 head's backward also makes an e5m2 copy of it): 4 or 5 bytes per token and entry
    head_floor = 5 if model.lm_head.use_fp8 else 4
    phases = {}
    for st in stages:
        eager = state + st["masks"] + st["peak"]
        phases[f"training micro-step, {st['name']} ({st['seq_len']} tokens)"] = (
            eager, eager - st["logits_at_peak"] + head_floor * st["seq_len"] * vocab)
    phases["optimizer step"] = (state + opt_step,) * 2
    eager = state - grad_bytes + held_between_steps + validation.masks + validation.peak
    phases[f"validation forward ({args.val_seq_len} tokens)"] = (
        eager, eager - validation.logits_at_peak + 2 * min(model.eval_chunk_tokens, args.val_seq_len) * vocab)
    context = CUDA_CONTEXT_BYTES
    nccl = NCCL_BYTES if nproc > 1 else 0
    phase = max(phases, key=lambda name: phases[name][0])
    estimate_phase = max(phases, key=lambda name: phases[name][1])
    peak, estimate = phases[phase][0] + context + nccl, phases[estimate_phase][1] + context + nccl
    usable = usable_bytes(gpu)
    return dict(
        params=param_bytes, param_count=sum(p.numel() for p in params), buffers=buffer_bytes, grads=grad_bytes,
        optimizer_state=opt_state, adam_state=adam_bytes, adam_kind=type(adam).__name__, muon_state=muon_bytes,
        muon_matrices_held=muon_held, muon_matrices=muon_count, muon_state_whole=whole, data=data,
        warmup_snapshot=snapshot, stages=stages, optimizer_step=opt_step,
        validation=dict(seq_len=args.val_seq_len, head_chunk=model.eval_chunk_tokens, peak=validation.peak,
                        masks=validation.masks, logits_at_peak=validation.logits_at_peak,
                        grads_held=held_between_steps),
        cuda_context=context, nccl=nccl, phases={name: eager for name, (eager, _) in phases.items()},
        compiled_estimates={name: est for name, (_, est) in phases.items()}, peak_phase=phase, peak=peak,
        compiled_estimate_phase=estimate_phase, compiled_estimate=estimate, usable=usable, fits=peak <= usable,
        fits_compiled_estimate=estimate <= usable, headroom=usable - peak,
        fp8_head=model.lm_head.use_fp8,
        fp8_mlp=any(m.use_fp8 for m in model.modules() if isinstance(m, fp8_mlp_feature.FP8MLP)))


def split_flags(args: tg.Hyperparameters, k: int) -> dict | None:
    """Flags that cut every training sequence into k (same tokens per step: k times the micro-batches), or None
    when a length would not stay a multiple of 128."""
    stages = tg.training_stages(args)
    if not stages:
        if args.seq_len % (k * tg.BLOCK_SIZE):
            return None
        return dict(seq_len=args.seq_len // k, micro_batches=args.micro_batches * k)
    items = args.stages.split(",")
    out = []
    for item in items:
        seq_len, rest = item.split(":", 1)
        if int(seq_len) % (k * tg.BLOCK_SIZE):
            return None
        out.append(f"{int(seq_len) // k}:{rest}")
    return dict(stages=",".join(out), micro_batches=args.micro_batches * k)


def val_split_flags(args: tg.Hyperparameters, j: int, nproc: int) -> dict | None:
    """--val_seq_len cut by j, where it stays a multiple of 128 and val_tokens still divides into whole steps."""
    if args.val_seq_len % (j * tg.BLOCK_SIZE) or args.val_tokens % (nproc * args.val_seq_len // j):
        return None
    return dict(val_seq_len=args.val_seq_len // j)


def with_flags(args: tg.Hyperparameters, flags: dict) -> tg.Hyperparameters:
    return dataclasses.replace(args, **flags)


def find_fit(args: tg.Hyperparameters, gpu: Gpu, nproc: int, cache: dict, first: dict) -> dict | None:
    """The fewest splits of the training sequences (then of the validation sequence) under which even the eager
    peak fits: activations grow with the tokens of one micro-batch, and the knob that lowers them without changing
    the tokens per step is --seq_len (or --stages' lengths) down with --micro_batches up. None when nothing fits."""
    fixed = first["phases"]["optimizer step"] + first["cuda_context"] + first["nccl"]
    if fixed > first["usable"]:
        return None  # the state and the optimizer step alone do not fit: no sequence length helps
    longest = max(st["seq_len"] for st in first["stages"])
    for k in range(1, longest // tg.BLOCK_SIZE + 1):
        flags = split_flags(args, k)
        if flags is None:
            continue
        trial = with_flags(args, flags) if k > 1 else args
        plan = plan_memory(trial, gpu, nproc, cache)
        training = max(v for name, v in plan["phases"].items() if name.startswith("training"))
        if training + plan["cuda_context"] + plan["nccl"] > plan["usable"]:
            continue
        for j in range(1, trial.val_seq_len // tg.BLOCK_SIZE + 1):
            val_flags = val_split_flags(trial, j, nproc) if j > 1 else {}
            if val_flags is None:
                continue
            candidate = with_flags(trial, val_flags)
            plan = plan_memory(candidate, gpu, nproc, cache)
            if plan["fits"]:
                tg.check_config(candidate, nproc)
                return dict(flags={**(flags if k > 1 else {}), **val_flags}, plan=plan, args=candidate)
        return None
    return None


def command_line(flags: list[str], extra: dict, nproc: int) -> str:
    """The torchrun line: the given flags, then the plan's changes (later flags win in train_gpt)."""
    changed = [f"--{name}={value}" for name, value in extra.items()]
    kept = [f for f in flags if f.split("=", 1)[0][2:] not in extra]
    return " ".join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py",
                     *map(shlex.quote, kept + changed)])


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def table(plan: dict, flags: list[str], gpu_name: str, nproc: int) -> list[str]:
    """The human-readable plan: one row per kind of memory (GiB per GPU of rank 0), then each phase's total."""
    gpu = GPUS[gpu_name]
    worst = max(plan["stages"], key=lambda st: st["masks"] + st["peak"])
    fp8 = " and ".join(name for name, on in (("head", plan["fp8_head"]), ("MLPs", plan["fp8_mlp"])) if on) or "none"
    muon = f"every matrix ({NO_CHECKPOINT_HINT})" if plan["muon_state_whole"] else \
        f"{plan['muon_matrices_held']} of {plan['muon_matrices']} matrices"
    val = plan["validation"]
    rows = [
        ("parameters", plan["params"], f"exact: {plan['param_count']:,}, in their GPU dtypes"),
        ("buffers", plan["buffers"], "exact: rotary tables, FP8 scales, loss tables"),
        ("gradients", plan["grads"], "exact: one per parameter, its dtype, all-reduced in place (no buckets)"),
        ("optimizer state", plan["optimizer_state"], f"exact: {plan['adam_kind']} {gib(plan['adam_state'])}, "
                                                     f"Muon {gib(plan['muon_state'])} ({muon})"),
        ("tokens on the GPU", plan["data"], "exact: the validation set and two steps' batches"),
        ("warm-up weight copy", plan["warmup_snapshot"], "exact: compile_warmup's state_dict copy"),
        ("block masks", worst["masks"], f"exact: FlexAttention BlockMasks, {worst['seq_len']} tokens"),
        ("activations", worst["saved"], f"eager, measured: saved for backward, {worst['seq_len']} tokens"),
        ("transients", worst["peak"] - worst["saved"], f"eager, measured: the rest of the micro-step's peak (of "
                                                       f"which peak {gib(worst['logits_at_peak'])} vocabulary-wide)"),
        ("optimizer step", plan["optimizer_step"], "eager, measured: Muon's gathers and Newton-Schulz, Adam's"),
        ("validation forward", val["peak"] + val["masks"], f"eager, measured: {val['seq_len']} tokens, no_grad, "
                                                           f"head in {val['head_chunk']}-token chunks"),
        ("CUDA context", plan["cuda_context"], "estimate"),
        ("NCCL buffers", plan["nccl"], "estimate" if nproc > 1 else "none: one process"),
    ]
    lines = [f"memory plan: {nproc} x {gpu_name} ({gpu.model}; FP8 matmuls: {fp8}), flags: "
             f"{' '.join(flags) or '(defaults)'}",
             f"usable per GPU: {gib(plan['usable'])} GiB ({USABLE_FRACTION:.0%} of {gpu.nominal_gb} GiB, an estimate)",
             "per GPU, rank 0 (it owns the most Muon matrices), GiB:"]
    lines += [f"  {name:21s}{gib(value):>7s}  {note}" for name, value, note in rows]
    lines.append("phases (state + what the phase adds), GiB: eager | compiled estimate")
    for name, eager in plan["phases"].items():
        lines.append(f"  {name:58s}{gib(eager):>7s} | {gib(plan['compiled_estimates'][name])}")
    lines.append(f"peak, eager (upper bound): {gib(plan['peak'])} GiB in the {plan['peak_phase']}, with context and "
                 f"NCCL; compiled estimate: {gib(plan['compiled_estimate'])} GiB (the vocabulary-wide tensors "
                 f"replaced by the head's bf16 output and gradient)")
    return lines


def verdict(plan: dict) -> str:
    if plan["fits"]:
        return "fits"
    return "fits_if_compiled" if plan["fits_compiled_estimate"] else "does_not_fit"


def run(flags: list[str], gpu_name: str, nproc: int) -> tuple[int, list[str], dict]:
    """(exit code, lines to print, the JSON report) of the plan for train_gpt flags on nproc x gpu_name."""
    gpu = gpu_spec(gpu_name)
    if nproc < 1:
        raise SystemExit(f"error: --nproc={nproc} must be >= 1 (GPUs, one process each)")
    args = tg.apply_overrides(tg.Hyperparameters(), flags)
    tg.check_config(args, nproc)
    if args.teacher:
        raise SystemExit("error: --teacher: the plan does not model the teacher (its checkpoint decides its size); "
                         "plan the run without --teacher and add the teacher's weights and one forward")
    cache = {}
    plan = plan_memory(args, gpu, nproc, cache)
    lines = table(plan, flags, gpu_name, nproc)
    accum = args.micro_batches // nproc
    longest = max(st["seq_len"] for st in plan["stages"])
    outcome = verdict(plan)
    report = dict(gpu=gpu_name, nproc=nproc, flags=flags, verdict=outcome, accumulation=accum, **plan,
                  estimates=dict(usable_fraction=USABLE_FRACTION, cuda_context=CUDA_CONTEXT_BYTES, nccl=plan["nccl"]),
                  activations="eager, measured on the meta device with FlexAttention's saved set: an upper bound "
                              "for the compiled run")
    usable = f"{gib(plan['usable'])} GiB usable"
    if outcome == "fits":
        lines.append(f"fits: yes, even eager: {gib(plan['headroom'])} GiB to spare of {usable}")
    elif outcome == "fits_if_compiled":
        lines.append(f"fits: only compiled, by the estimate ({gib(plan['compiled_estimate'])} of {usable}; eager "
                     f"{gib(plan['peak'])}); measure one GPU's peak (tools/preflight.py --only=step_time) before "
                     f"renting {nproc}")
    else:
        lines.append(f"fits: no ({gib(plan['peak'])} GiB eager, {gib(plan['compiled_estimate'])} compiled estimate, "
                     f"of {usable})")
    lines.append(f"accumulation: {accum} micro-step{'s' * (accum != 1)} per GPU per optimizer step "
                 f"(--micro_batches={args.micro_batches} over {nproc} GPU{'s' * (nproc != 1)}), each one sequence of "
                 f"up to {longest} tokens: memory follows the sequence length, not the accumulation")
    report["command"] = command_line(flags, {}, nproc) if outcome != "does_not_fit" else None
    if outcome != "fits":
        fit = find_fit(args, gpu, nproc, cache, plan)
        if fit is None:
            need = plan["phases"]["optimizer step"] + plan["cuda_context"] + plan["nccl"]
            lines.append(f"no sequence length fits eager: the state and the optimizer step alone need {gib(need)} GiB; "
                         f"use a GPU with more memory (more GPUs shrink only Muon's share)")
        else:
            new, changes = fit["plan"], " ".join(f"--{k}={v}" for k, v in fit["flags"].items())
            fit_accum = fit["args"].micro_batches // nproc
            lines.append(f"fits even eager with {changes}: {gib(new['peak'])} GiB, the same tokens per step in "
                         f"{fit_accum} micro-step{'s' * (fit_accum != 1)} per GPU (shorter sequences: attention "
                         f"sees less context, so it is not the same run)")
            report.update(fits_eager_with=fit["flags"], fits_eager_with_peak=new["peak"],
                          accumulation_fits_eager=fit_accum, command_fits_eager=command_line(flags, fit["flags"],
                                                                                           nproc))
    if report["command"]:
        lines.append(f"command: {report['command']}")
    if report.get("command_fits_eager"):
        if report["command"] is None:
            report["command"] = report["command_fits_eager"]
        lines.append(f"command (fits even eager): {report['command_fits_eager']}")
    return (1 if outcome == "does_not_fit" else 0), lines, report


def cli(flags_text: str, gpu_name: str | None, nproc: int, prog: str = "memory_plan") -> int:
    """Print the plan and `plan: {json}`; errors as one `<prog>: error: ...` line on stderr (exit code 2)."""
    try:
        if not gpu_name:
            raise SystemExit(f"error: --plan needs --gpu; valid: {', '.join(GPUS)}")
        code, lines, report = run(shlex.split(flags_text), gpu_name, nproc)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        message = str(e).splitlines()[0]
        print(f"{prog}: {message if message.startswith('error') else 'error: ' + message}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print(f"plan: {json.dumps(report)}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes) of the run")
    parser.add_argument("--flags", default="", help='train_gpt flags of the run, e.g. "--preset=frontier"')
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, item in enumerate(argv[:-1]):  # `--flags "--preset=frontier"`: argparse would read it as an option
        if item == "--flags":
            argv[i:i + 2] = [f"--flags={argv[i + 1]}"]
            break
    cli_args = parser.parse_args(argv)
    return cli(cli_args.flags, cli_args.gpu, cli_args.nproc)


if __name__ == "__main__":
    sys.exit(main())
