"""Start a Kronecker (--kron_mlp) or Kronecker-sparse (--ks_mlp) student from a dense checkpoint, layer by layer.

    python tools/mlp_init.py --checkpoint dense.pt --out student.pt --student_flags "--kron_mlp=both --kron_rank=2"
        [--method distill|vanloan|weights] [--prune FRACTION] [--train_files GLOB] [--tokens N] [--steps N]
        [--lr X] [--seq_len N] [--batch_size N] [--seed S] [--device cpu|cuda]
    python train_gpt.py <the flags it prints> --init_from=student.pt

The student is the checkpoint's own configuration plus --student_flags (train_gpt.apply_overrides). Every tensor
whose name and shape match is copied from the teacher: embeddings, attention, scalars, head, and the MLP matrices
the flags leave alone. Each MLP matrix the flags replace (a dense c_fc/c_proj becoming a KronLinear or KSLinear, or
a factorized one changing shape) is initialized by --method:

  vanloan   Kronecker only: the nearest rank-r Kronecker sum in Frobenius norm (kernels.van_loan_decompose of the
            teacher's matrix; factors and rank are the student module's).
  weights   Regression on fresh N(0, I) inputs x: Adam on mean((x W_s^T - x W^T)^2), tools/ks_fit.py's objective.
            Its expectation is ||W_s - W||_F^2 / out, so for a Kronecker student vanloan is its exact optimum; this
            method exists for KS chains, which have no closed form. Starts from the module's own init.
  distill   (default) Layer-wise distillation on real activations. The dense model reads --tokens tokens of
            --train_files (default: the checkpoint's) at its final long window; forward hooks on every block.mlp
            capture the MLP's input (the normed residual stream) and output. Then block by block, Adam trains the
            student MLP's replaced matrices (from the vanloan init when Kronecker, else the module's own init) to
            minimize the MSE to the dense MLP's output on those inputs. Each student block sees the *teacher's*
            activations, not its own upstream blocks' outputs ("match the teacher MLP on teacher activations"):
            the blocks are independent fits and upstream errors do not feed into downstream targets. Weighting by
            real inputs is the point: directions the MLP never sees cost nothing, unlike in `weights`. A block
            whose MSE the fit raises (too few steps, too high an LR) keeps its starting factors.

--prune FRACTION zeroes that fraction of each replaced matrix's entries, smallest |w| first (magnitude pruning),
before any method sees it: vanloan and weights decompose the pruned matrix, and distill writes the pruned matrices
into the teacher's MLPs before capturing, so the student matches the pruned dense MLPs (each replaced teacher matrix
must then be dense). Per matrix it reports what pruning alone costs, ||W_p - W||_F / ||W||_F, and the final
decomposition's error against both the pruned matrix (what it was fitted to) and the original one.

The output is a train_gpt.py checkpoint at step 0 with fresh optimizer states, so `--init_from` (weights only) and
`--resume` (its flags, step 0) both start from it. It prints, per replaced matrix, the relative Frobenius error
||W_s - W||_F / ||W||_F and, for distill, the per-block MSE before/after; then the parameter counts and the
command that starts a fresh run from the student: a new run_name (the teacher's plus the flags that changed, unless
--student_flags name one) and no save/resume flags of the teacher's run (the student's stored flags drop them too).
"""
import argparse
import copy
import dataclasses
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402
from kernels import KronLinear, KSLinear, kron_dense_weight, van_loan_decompose  # noqa: E402

MLP_MATRICES = ("c_fc", "c_proj")
FACTORIZED = (KronLinear, KSLinear)
METHODS = ("distill", "vanloan", "weights")


@dataclass
class Replaced:
    """One student MLP matrix that the teacher cannot give by name: `module` is the student's KronLinear or
    KSLinear at `name`, `original` the teacher's (out, in) matrix there (fp32, on the work device) and
    `teacher_module` the teacher's layer holding it. `dense` is what the method fits: original, or with --prune
    its pruned copy."""
    block: int
    name: str
    module: nn.Module
    original: torch.Tensor
    teacher_module: nn.Module
    dense: torch.Tensor | None = None
    init_err: float = float("nan")  # relative Frobenius error at the module's own init (vs the original)

    def __post_init__(self):
        if self.dense is None:
            self.dense = self.original

    @property
    def kind(self) -> str:
        return "kron" if isinstance(self.module, KronLinear) else "ks"


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------------------------------------------
# Teacher, student, and what to copy


def runnable_on(args: tg.Hyperparameters, device: torch.device) -> tg.Hyperparameters:
    """args with the kernel impls this device can run (the state dict is the same for every impl)."""
    args = copy.deepcopy(args)
    if device.type != "cuda":
        args.kron_impl = "auto" if args.kron_impl == "triton" else args.kron_impl  # auto = torch on a CPU
        args.ks_impl = "auto" if args.ks_impl == "triton" else args.ks_impl  # auto = bmm on a CPU
    return args


# The teacher run's bookkeeping: a fresh run from the student starts with the defaults unless --student_flags set them
FRESH_RUN_DEFAULTS = ("save_every", "keep_checkpoints", "save_checkpoint")
# Left out of the derived run_name: bookkeeping, not what makes the student a different model
NOT_IN_RUN_NAME = ("run_name", "init_from", "resume", *FRESH_RUN_DEFAULTS)


def student_config(teacher_args: tg.Hyperparameters, student_flags: str) -> tg.Hyperparameters:
    """The teacher's flags without its run's bookkeeping, plus student_flags; a new run_name unless they give one."""
    flags = shlex.split(student_flags)
    args = copy.deepcopy(teacher_args)
    defaults = tg.Hyperparameters()
    for name in FRESH_RUN_DEFAULTS:
        setattr(args, name, getattr(defaults, name))
    args = tg.apply_overrides(args, flags)
    args.init_from = args.resume = ""  # the student starts here, not from whatever started the teacher
    if not any(f.startswith("--run_name=") for f in flags):
        args.run_name = student_run_name(teacher_args, args)
    tg.check_config(args, 1)
    return args


def student_run_name(teacher_args: tg.Hyperparameters, args: tg.Hyperparameters) -> str:
    """<teacher run_name>_<flag=value>_... of the flags the student changes, e.g. smoke_kron_mlp=both_kron_rank=2."""
    changed = [f"{k}={v}" for k, v in dataclasses.asdict(args).items()
               if k not in NOT_IN_RUN_NAME and getattr(teacher_args, k) != v]
    name = "_".join([teacher_args.run_name, *changed] if changed else [teacher_args.run_name, "student"])
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "-", name)  # a folder name without shell or path characters


def dense_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a CastedLinear, KronLinear or KSLinear."""
    if isinstance(module, KronLinear):
        return kron_dense_weight(module.A, module.B)
    if isinstance(module, KSLinear):
        return module.dense_weight()
    return module.weight


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


@torch.no_grad()
def find_replaced(teacher: tg.GPT, student: tg.GPT) -> list[Replaced]:
    if len(teacher.blocks) != len(student.blocks):
        fail(f"the student has {len(student.blocks)} blocks and the teacher {len(teacher.blocks)}; --student_flags "
             f"may change the MLP matrices, not the depth")
    replaced = []
    for i, (tb, sb) in enumerate(zip(teacher.blocks, student.blocks)):
        for which in MLP_MATRICES:
            s = getattr(sb.mlp, which, None)
            if not isinstance(s, FACTORIZED):
                continue
            t = getattr(tb.mlp, which, None)
            if t is None:
                fail(f"the teacher's block {i} MLP is a {type(tb.mlp).__name__}; it has no {which} to factorize")
            if same_structure(t, s):
                continue  # copied by name
            W = dense_matrix(t).detach().float().clone()
            if tuple(W.shape) != (s.out_features, s.in_features):
                fail(f"blocks.{i}.mlp.{which}: the student's matrix is {s.out_features}x{s.in_features} but the "
                     f"teacher's is {W.shape[0]}x{W.shape[1]}; keep model_dim and mlp_ratio")
            replaced.append(Replaced(i, f"blocks.{i}.mlp.{which}", s, W, t))
    return replaced


@torch.no_grad()
def copy_matching(teacher: tg.GPT, student: tg.GPT) -> tuple[list[str], list[str]]:
    """Copy every teacher tensor whose name and shape the student shares. Returns (copied, left at init)."""
    own, theirs = student.state_dict(), teacher.state_dict()
    copied = [k for k, v in theirs.items() if k in own and own[k].shape == v.shape]
    student.load_state_dict({k: theirs[k] for k in copied}, strict=False)
    return copied, [k for k in own if k not in copied]


# -----------------------------------------------------------------------------------------------------------------
# The three initializations


def rel_error(r: Replaced, target: torch.Tensor | None = None) -> float:
    """||W_s - target||_F / ||target||_F; target defaults to the teacher's original matrix."""
    target = r.original if target is None else target
    with torch.no_grad():
        return ((dense_matrix(r.module).float() - target).norm() / target.norm()).item()


def magnitude_prune(W: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of W with round(fraction * numel) entries zeroed, smallest |w| first (ties: lower index first)."""
    n = round(fraction * W.numel())
    flat = W.flatten().clone()
    flat[torch.argsort(flat.abs(), stable=True)[:n]] = 0
    return flat.view_as(W)


@torch.no_grad()
def prune_replaced(replaced: list[Replaced], fraction: float, write_teacher: bool):
    """r.dense becomes the pruned r.original. write_teacher: also put it into the teacher's MLP, so that the
    activations captured from the teacher are the pruned model's."""
    for r in replaced:
        if write_teacher and not isinstance(getattr(r.teacher_module, "weight", None), torch.Tensor):
            fail(f"--prune with --method distill writes the pruned matrix into the teacher, but the teacher's "
                 f"{r.name} is a {type(r.teacher_module).__name__} (factorized); use --method vanloan or weights, "
                 f"or a dense teacher")
        r.dense = magnitude_prune(r.original, fraction)
        if write_teacher:
            r.teacher_module.weight.copy_(r.dense.to(r.teacher_module.weight.dtype))


@torch.no_grad()
def vanloan_init(r: Replaced):
    m = r.module
    try:
        A, B = van_loan_decompose(r.dense.double(), *m.factors, rank=m.rank)
    except ValueError as e:
        fail(f"{r.name}: {e}")
    m.A.copy_(A)
    m.B.copy_(B)


def train_params(params: list, loss_fn, steps: int, lr: float):
    """Adam on params for `steps` steps of loss_fn(step), the LR decaying linearly to 0 over the last half."""
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        mult = min(1.0, 2 * (steps - step) / steps)
        for group in opt.param_groups:
            group["lr"] = lr * mult
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fit_weights(r: Replaced, steps: int, lr: float, batch: int, gen: torch.Generator):
    """ks_fit's objective: fresh Gaussian inputs every step, so there is nothing to overfit."""
    W = r.dense

    def loss(_):
        x = torch.randn(batch, W.shape[1], generator=gen, device=W.device)
        return F.mse_loss(r.module(x), x @ W.T)

    train_params(list(r.module.parameters()), loss, steps, lr)


@torch.no_grad()
def capture_mlp_io(teacher: tg.GPT, sequences: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block's MLP over all sequences, each (tokens, dim) fp32 on the CPU."""
    seen = [([], []) for _ in teacher.blocks]

    def hook(i):
        def record(module, inputs, output):
            seen[i][0].append(inputs[0].detach().flatten(0, -2).float().cpu())
            seen[i][1].append(output.detach().flatten(0, -2).float().cpu())
        return record

    handles = [b.mlp.register_forward_hook(hook(i)) for i, b in enumerate(teacher.blocks)]
    try:
        for seq in sequences:
            teacher.hidden(seq)  # the head is not needed
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(xs), torch.cat(ys)) for xs, ys in seen]


@torch.no_grad()
def mlp_mse(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
    """(mean squared error, relative error ||mlp(x) - y|| / ||y||) over all rows."""
    sse = sum(F.mse_loss(mlp(xc), yc, reduction="sum").item() for xc, yc in zip(x.split(chunk), y.split(chunk)))
    return sse / y.numel(), math.sqrt(sse / max(y.square().sum().item(), 1e-30))


def distill_block(mlp: nn.Module, params: list, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                  batch: int, gen: torch.Generator):
    """Adam on params (the block's replaced matrices) to match y = teacher_mlp(x) on random row batches."""
    frozen = [p for p in mlp.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)

    def loss(_):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen, device=x.device)
        return F.mse_loss(mlp(x[idx]), y[idx])

    try:
        train_params(params, loss, steps, lr)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def read_tokens(pattern: str, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of the shards matching pattern, in sorted order."""
    parts, have = [], 0
    for path in tg.find_shards(pattern, "train"):
        parts.append(tg.load_data_shard(path)[:tokens - have])
        have += len(parts[-1])
        if have == tokens:
            return torch.cat(parts)
    fail(f"{pattern!r} holds {have} tokens, fewer than --tokens={tokens}; lower --tokens or add shards")


# -----------------------------------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the dense (teacher) train_gpt.py checkpoint")
    p.add_argument("--out", required=True, help="where to write the student checkpoint")
    p.add_argument("--student_flags", required=True,
                   help='train_gpt.py flags applied on top of the checkpoint\'s, e.g. "--kron_mlp=both --kron_rank=2"')
    p.add_argument("--method", choices=METHODS, default="distill")
    p.add_argument("--prune", type=float, default=0.0, metavar="FRACTION",
                   help="zero this fraction of each replaced matrix's entries (smallest |w|) before the method")
    p.add_argument("--train_files", help="distill: shards to read (default: the checkpoint's train_files)")
    p.add_argument("--tokens", type=int, default=32768, help="distill: tokens of activations to capture")
    p.add_argument("--seq_len", type=int, default=0,
                   help="distill: tokens per teacher forward (default min(checkpoint seq_len, 8192, --tokens "
                        "rounded down to 128); sliding windows make longer ones unnecessary)")
    p.add_argument("--steps", type=int, default=300, help="distill/weights: Adam steps per block / per matrix")
    p.add_argument("--lr", type=float, default=1e-2, help="distill/weights: Adam peak LR (linear decay to 0 "
                                                          "over the second half)")
    p.add_argument("--batch_size", type=int, default=4096, help="distill/weights: rows per Adam step")
    p.add_argument("--seed", type=int, default=0, help="student init (KS factors) and the row/input sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--student_flags" in argv[:-1]:  # argparse would read a lone "--ks_mlp=both" value as an option
        i = argv.index("--student_flags")
        argv[i:i + 2] = [f"--student_flags={argv[i + 1]}"]
    opts = build_parser().parse_args(argv)
    if not 0 <= opts.prune < 1:
        fail(f"--prune={opts.prune} must be in [0, 1): the fraction of each replaced matrix's entries set to zero")
    device = torch.device(opts.device)
    ckpt = tg.load_checkpoint(opts.checkpoint)
    teacher_args = tg.checkpoint_model_args(ckpt)
    student_args = student_config(teacher_args, opts.student_flags)
    teacher = tg.build_model(runnable_on(teacher_args, device))
    teacher.load_state_dict(ckpt["model"])
    teacher.to(device).eval()
    torch.manual_seed(opts.seed)
    student = tg.build_model(runnable_on(student_args, device)).to(device)

    replaced = find_replaced(teacher, student)
    if not replaced:
        fail(f"--student_flags {opts.student_flags!r} replace no MLP matrix of the teacher (its kron_mlp="
             f"{teacher_args.kron_mlp!r}, ks_mlp={teacher_args.ks_mlp!r}); pass --kron_mlp=fc|proj|both or "
             f"--ks_mlp=fc|proj|both")
    if opts.method == "vanloan" and any(r.kind == "ks" for r in replaced):
        fail("--method vanloan decomposes into Kronecker factors; this student has KS chains "
             f"({', '.join(r.name for r in replaced if r.kind == 'ks')}); use --method weights or distill")
    copied, fresh = copy_matching(teacher, student)
    replaced_keys = {f"{r.name}.{k}" for r in replaced for k in r.module.state_dict()}
    print(f"teacher {opts.checkpoint} (step {ckpt.get('step')}): copied {len(copied)} tensors; "
          f"{len(replaced)} replaced matrices ({', '.join(sorted({r.kind for r in replaced}))}), method {opts.method}")
    if set(fresh) - replaced_keys:
        print(f"warning: not in the teacher, left at the student's init: {sorted(set(fresh) - replaced_keys)}")

    for r in replaced:
        r.init_err = rel_error(r)
    if opts.prune > 0:
        prune_replaced(replaced, opts.prune, write_teacher=opts.method == "distill")
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    for r in replaced:
        if r.kind == "kron" and opts.method in ("vanloan", "distill"):
            vanloan_init(r)
        elif opts.method == "weights":
            fit_weights(r, opts.steps, opts.lr, opts.batch_size, gen)

    blocks = []
    if opts.method == "distill":
        blocks = distill(opts, teacher, teacher_args, student, replaced, gen, device)
    matrices = []
    if opts.method == "distill":
        print("relative Frobenius errors below are for reference: distill fits each MLP's function, and a factor "
              "scale moving between c_fc and c_proj changes them without changing the MLP")
    for r in replaced:
        m = dict(name=r.name, kind=r.kind, rel_err_init=r.init_err, rel_err=rel_error(r),
                 params=tg.count_params(r.module), dense_params=r.dense.numel())
        line = (f"{r.name}: {r.kind} {tuple(r.dense.shape)} params {m['params']:,} (dense {r.dense.numel():,}) "
                f"rel_frob_err {m['rel_err_init']:.4f} (module init) -> {m['rel_err']:.4f}")
        if r.dense is not r.original:
            m.update(prune=opts.prune, prune_err=((r.dense - r.original).norm() / r.original.norm()).item(),
                     rel_err_pruned=rel_error(r, r.dense))
            line += (f"; pruned {opts.prune:.0%}: pruning alone {m['prune_err']:.4f}, decomposition vs the pruned "
                     f"matrix {m['rel_err_pruned']:.4f}, vs the original {m['rel_err']:.4f}")
        matrices.append(m)
        print(line)

    student.cpu()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tg.save_checkpoint(out, student, tg.build_optimizers(student, student_args), student_args, 0, 0.0)
    flags = [f"--{k}={v}" for k, v in tg.changed_flags(student_args).items()]
    command = " ".join(["python train_gpt.py", *map(shlex.quote, flags), shlex.quote(f"--init_from={out}")])
    params = dict(teacher=tg.count_params(teacher), student=tg.count_params(student),
                  replaced_dense=sum(m["dense_params"] for m in matrices),
                  replaced_student=sum(m["params"] for m in matrices))
    print(f"params: teacher {params['teacher']:,}, student {params['student']:,} (replaced matrices "
          f"{params['replaced_dense']:,} -> {params['replaced_student']:,})")
    print(f"wrote {out}; train it with (or ./run.sh with the same flags):\n  {command}")
    return dict(method=opts.method, matrices=matrices, blocks=blocks, params=params, copied=copied,
                flags=flags, command=command, out=str(out))


def distill(opts, teacher, teacher_args, student, replaced, gen, device) -> list[dict]:
    tokens = read_tokens(opts.train_files or teacher_args.train_files, opts.tokens)
    seq_len = opts.seq_len or min(teacher_args.seq_len, 8192, opts.tokens // tg.BLOCK_SIZE * tg.BLOCK_SIZE)
    if seq_len <= 0 or seq_len % tg.BLOCK_SIZE or seq_len > opts.tokens:
        fail(f"--seq_len={seq_len} must be a multiple of {tg.BLOCK_SIZE} and at most --tokens={opts.tokens}")
    sequences = [s.to(device=device, dtype=torch.int32) for s in tokens[:opts.tokens // seq_len * seq_len]
                 .split(seq_len)]
    print(f"distill: capturing MLP inputs/outputs on {len(sequences)} x {seq_len} tokens of "
          f"{opts.train_files or teacher_args.train_files}")
    captured = capture_mlp_io(teacher, sequences)
    blocks = []
    for i, block in enumerate(student.blocks):
        mine = [r for r in replaced if r.block == i]
        if not mine:
            continue
        x, y = (t.to(device) for t in captured[i])
        params = [p for r in mine for p in r.module.parameters()]
        start = [p.detach().clone() for p in params]
        mse_before, rel_before = mlp_mse(block.mlp, x, y)
        distill_block(block.mlp, params, x, y, opts.steps, opts.lr, opts.batch_size, gen)
        mse_after, rel_after = mlp_mse(block.mlp, x, y)
        if mse_after > mse_before:  # too few steps or too high an LR: keep the start
            print(f"block {i}: distillation raised the mse ({mse_before:.4e} -> {mse_after:.4e}); kept the start")
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            mse_after, rel_after = mse_before, rel_before
        blocks.append(dict(block=i, mse_before=mse_before, mse_after=mse_after, rel_before=rel_before,
                           rel_after=rel_after, tokens=len(x)))
        print(f"block {i}: mlp output mse {mse_before:.4e} -> {mse_after:.4e}, relative error {rel_before:.4f} -> "
              f"{rel_after:.4f} ({len(x)} tokens, {opts.steps} steps)")
    return blocks


if __name__ == "__main__":
    main()
