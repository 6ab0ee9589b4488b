"""Kronecker-factorized linear layers: plain-torch references, fused Triton kernels (forward and backward),
the custom ops (with autograd) and nn.Module that wrap them, and the Van Loan nearest-Kronecker decomposition;
then the same for Kronecker-sparse (KS) factors and chains.

Convention (same as torch.kron): W (M x K) = sum_{i<r} kron(A_i, B_i) with A_i (m1, k1), B_i (m2, k2),
M = m1*m2, K = k1*k2. A token x (K,) viewed row-major as X (k1, k2) maps to Y = sum_i A_i X B_i^T (m1, m2),
flattened to (M,). Backward, with dY (m1, m2) and V_i = dY B_i:
    dX = sum_i A_i^T V_i,   dA_i = sum_tokens V_i X^T,   dB_i = sum_tokens dY^T (A_i X).

Each Triton launch sits behind a torch.library custom op (namespace kernels::, e.g. torch.ops.kernels.kron_apply)
with a fake-tensor function and registered autograd, so torch.compile sees one opaque op per launch instead of
graph-breaking on the kernel launch. Importing this file registers those ops (its only side effect) and works
without triton (then HAS_TRITON is False and only the torch paths are available).
"""
import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# triton.jit picks the interpreter at decoration time, so what counts is the value at import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# -----------------------------------------------------------------------------
# Plain-torch references

def _a_first(m1, k1, m2, k2):
    """True when contracting k1 first (T = A X, then T B^T) costs no more MACs than contracting k2 first."""
    return m1 * k2 * (k1 + m2) <= k1 * m2 * (k2 + m1)


def kron_linear_ref(x, A, B):
    """y = x @ W^T with W = sum_i kron(A_i, B_i), never materializing W. x (..., K), A (r, m1, k1), B (r, m2, k2)."""
    _, m1, k1 = A.shape
    _, m2, k2 = B.shape
    X = x.reshape(-1, k1, k2)
    if _a_first(m1, k1, m2, k2):
        T = torch.einsum("rac,ncd->nrad", A, X)
        Y = torch.einsum("nrad,rbd->nab", T, B)
    else:
        U = torch.einsum("ncd,rbd->nrcb", X, B)
        Y = torch.einsum("nrcb,rac->nab", U, A)
    return Y.reshape(*x.shape[:-1], m1 * m2)


def kron_dense_weight(A, B):
    """W = sum_i kron(A_i, B_i), shape (m1*m2, k1*k2). For tests, debugging and impl="dense" only."""
    return sum(torch.kron(a, b) for a, b in zip(A, B))


# -----------------------------------------------------------------------------
# Triton kernels
#
# Both kernels view a block of BLOCK_T tokens so that each contraction is one GEMM over the whole block:
# the first factor contracts X laid out as [p, (t, q)], and the result [m, (t, q)] is, read row-major,
# exactly [(m, t), q], the layout the second GEMM needs, so tl.reshape replaces any transpose. Dims are
# padded to powers of two (at least 16, the minimum tl.dot shape on GPU) and masked. Inputs are read in
# their dtype, factors are cast to it on load, products accumulate in fp32, and the intermediate is
# rounded back to the input dtype before the second GEMM (as flash attention does with P).

def _pad(n):
    return max(16, 1 << (n - 1).bit_length())


# Per-program register budget in elements of the largest fp32 tile; sets the default BLOCK_T (2 tokens per program
# at GPT-2's MLP shapes), the first entry of each Kronecker launcher's config space (_kron_space).
_TILE_ELEMS = 8192


def _block_tokens(per_token_elems):
    return max(1, min(64, _TILE_ELEMS // per_token_elems))


def _launch_opts(tile_elems):
    return {"num_warps": 8 if tile_elems > 4096 else 4}


class KernelConfig(NamedTuple):
    """One point of a launcher's config space."""
    block: int  # tokens per program: BLOCK_T of the Kronecker kernels, BLOCK_N of the KS kernels
    num_warps: int
    num_stages: int | None = None  # None: Triton's default (3 on CUDA)

    def label(self):
        return f"block={self.block} warps={self.num_warps} stages={self.num_stages or 'default'}"


class KernelLaunch(NamedTuple):
    """One Triton launch exactly as its launcher computes it; calling it launches. tools/preflight.py --aot compiles
    the same launch for a named GPU without one (its tensors on the meta device), for every config of its space."""
    kernel: object
    args: tuple  # positional runtime arguments (tensors and ints), in the kernel's order
    constexprs: dict
    grid: tuple
    num_warps: int
    num_stages: int | None = None  # None: Triton's default (3 on CUDA)
    key: str = ""  # the problem as config tables name it: kernel, shape, layout, dtype (set by the plan function)
    config: KernelConfig | None = None  # the config this launch uses, one of space
    space: tuple = ()  # every KernelConfig the launcher may use for this problem, its default first

    def __call__(self):
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        self.kernel[self.grid](*self.args, **self.constexprs, **opts)


# -----------------------------------------------------------------------------
# Launch configs
#
# Each launcher has a small config space of (tokens per program, num_warps, num_stages), its first entry the
# untuned default. A JSON table written on a GPU by tools/bench_kernels.py --tune (every entry of the space timed
# per problem) picks one entry per (GPU arch, problem); with no table, or no entry, a launch takes the default.
# A table rather than triton.autotune: a launch stays a pure function of its shapes and one file, so runs are
# deterministic (the weight-grad kernels' tokens per program set their fp32 summation order) and repeatable, the
# choice can be recorded with a run, and tools/preflight.py --aot compiles and checks every entry a table could
# pick without a GPU; autotune would time configs inside the first training steps and pick by a noisy race.
# Table format: {"format": 1, "archs": {"sm_90": {"device": ..., "configs": {key: {"block", "num_warps",
# "num_stages", ...}}}}} ("interpreter": tuned under TRITON_INTERPRET=1 on a CPU, for tests only).

CONFIG_TABLE_ENV = "KERNEL_CONFIGS"  # a table's path; none, off or empty: no table
CONFIG_TABLE_PATH = Path(__file__).resolve().with_name("kernel_configs.json")  # read when the variable is unset
CONFIG_TABLE_FORMAT = 1
_FIX = (f"rerun `python tools/bench_kernels.py --tune` on this GPU to rewrite it, delete the entry, or set "
        f"{CONFIG_TABLE_ENV}=none for the default configs")


_PATHS, _TABLES = {}, {}  # ${KERNEL_CONFIGS} -> config_table_path(); path -> load_config_table(path)


class KernelConfigError(ValueError):
    """A config table that cannot be used; the message is one `error: ...` line naming the fix."""


def config_table_path():
    """The table the launchers read: ${KERNEL_CONFIGS}, else kernel_configs.json beside this file where it exists
    (looked for once per process and value of the variable: every launch asks)."""
    env = os.environ.get(CONFIG_TABLE_ENV)
    if env not in _PATHS:
        if env is None:
            _PATHS[env] = CONFIG_TABLE_PATH if CONFIG_TABLE_PATH.exists() else None
        else:
            _PATHS[env] = None if env.strip().lower() in ("", "none", "off") else Path(env)
    return _PATHS[env]


def _parse_config(entry, where):
    try:
        block, warps, stages = entry["block"], entry["num_warps"], entry.get("num_stages")
    except (TypeError, KeyError) as e:
        raise KernelConfigError(f"error: {where} is not a config {{block, num_warps, num_stages}} ({e!r}); "
                                f"fix: {_FIX}") from None
    ok = all(type(v) is int and v >= 1 for v in (block, warps)) and (stages is None or type(stages) is int)
    if not ok:
        raise KernelConfigError(f"error: {where} has block={block!r} num_warps={warps!r} num_stages={stages!r}; "
                                f"expected positive ints (num_stages null for the default); fix: {_FIX}")
    return KernelConfig(block, warps, stages)


def load_config_table(path):
    """{arch: {key: KernelConfig}} of a table file, checked in form (each entry's membership in its launch's space
    is checked when a launch reads it: pick_config); KernelConfigError for an unusable file."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KernelConfigError(f"error: kernel config table {path} is unreadable ({e}); fix: {_FIX}") from None
    if not isinstance(table, dict) or table.get("format") != CONFIG_TABLE_FORMAT or not isinstance(
            table.get("archs"), dict):
        raise KernelConfigError(f"error: {path} is not a kernel config table (format {CONFIG_TABLE_FORMAT} with "
                                f"an 'archs' object); fix: {_FIX}")
    out = {}
    for arch, section in table["archs"].items():
        configs = section.get("configs") if isinstance(section, dict) else None
        if not isinstance(configs, dict):
            raise KernelConfigError(f"error: {path}: arch {arch!r} has no 'configs' object; fix: {_FIX}")
        out[arch] = {key: _parse_config(entry, f"{path}: {arch} entry {key!r}") for key, entry in configs.items()}
    return out


def config_table():
    """The launchers' table ({} when there is none), read on first use; reset_config_table() forgets it."""
    path = config_table_path()
    if path is None:
        return {}
    if path not in _TABLES:
        if not path.exists():
            raise KernelConfigError(f"error: {CONFIG_TABLE_ENV}={path} does not exist; fix: point it at a table "
                                    f"written by `python tools/bench_kernels.py --tune`, or set "
                                    f"{CONFIG_TABLE_ENV}=none")
        _TABLES[path] = load_config_table(path)
    return _TABLES[path]


def config_table_info():
    """None without a table, else {"path", "sha256", "entries": {arch: count}}: what a run's log should record."""
    import hashlib
    path = config_table_path()
    if path is None:
        return None
    entries = {arch: len(v) for arch, v in config_table().items()}
    return dict(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), entries=entries)


def reset_config_table():
    """Forget the table read so far (a test or tool that rewrites the file or the variable calls this)."""
    _PATHS.clear()
    _TABLES.clear()


@functools.lru_cache(maxsize=None)
def _cuda_arch(index):
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def device_arch(device):
    """The table section launches on this device read: "sm_90" etc. on a GPU, "interpreter" for CPU tensors under
    TRITON_INTERPRET=1, None elsewhere (meta tensors: tools/preflight.py --aot names the arch itself)."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return "interpreter" if device.type == "cpu" and TRITON_INTERPRET else None


def pick_config(key, space, arch):
    """The table's config for (arch, key), checked to be one of space; space[0] (the default) without one."""
    chosen = config_table().get(arch, {}).get(key) if arch is not None else None
    if chosen is None:
        return space[0]
    if chosen not in space:
        raise KernelConfigError(f"error: kernel config table {config_table_path()}: {arch} entry {key!r} selects "
                                f"{chosen.label()}, not in that launch's space ({'; '.join(c.label() for c in space)}"
                                f"); fix: {_FIX}")
    return chosen


def _config_for(config, key, space, device):
    """config (None: the table's choice for device; "default": space[0], no table read) checked against space."""
    if config is None:
        return pick_config(key, space, device_arch(device))
    if config == "default":
        return space[0]
    config = KernelConfig(*config)
    if config not in space:
        raise ValueError(f"{key}: {config.label()} is not in the config space "
                         f"({'; '.join(c.label() for c in space)})")
    return config


@functools.lru_cache(maxsize=None)  # asked at every launch; a pure function of its arguments
def _kron_space(per_token, token_loop):
    """The default (the _TILE_ELEMS budget; 8 warps above 4096 tile elements, else 4; Triton's stages), then one step
    along each axis: 2x the tokens per program (and 4x for the apply kernel), each with the warps the same rule
    gives its tile, at most 64 tokens; the other warp count; 2 stages for the weight grad (token_loop), the only
    kernel with a loop for Triton to pipeline (the apply kernel loops over rank alone, 1 in every run so far).
    Not the full product, whose every entry preflight --aot would compile per arch and bench_kernels.py --tune
    time: its corners fail at GPT-2's shapes (the apply kernel at 8 tokens and 4 warps: 255 registers on sm_90;
    the weight grad at 8 tokens: 255 registers, 0.1-1.4 KB stack, and at 3 stages 255 KB shared on sm_90, over its
    227 KB). 8 tokens at 8 warps stays, for sm_90 (110-209 registers, no stack), though the B-first order spills
    7-8 KB per thread there on sm_80/sm_89 (preflight --aot marks it; the tuner times it like any other)."""
    def step(t, **kw):
        t = min(64, t)
        return KernelConfig(t, _launch_opts(t * per_token)["num_warps"], **kw)
    default = step(_block_tokens(per_token))
    tokens = [2] if token_loop else [2, 4]
    space = [default] + [step(default.block * f) for f in tokens] + [default._replace(num_warps=12 - default.num_warps)]
    return tuple(dict.fromkeys(space + ([default._replace(num_stages=2)] if token_loop else [])))


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


if HAS_TRITON:

    # Y_t = sum_i P_i X_t Q_i^T, X_t (dp, dq) -> Y_t (dm, dn); per token 2*dm*dq*(dp+dn) FLOPs per rank,
    # (dp*dq + dm*dn) * elt bytes (x read once for all ranks, factors stay in cache). Forward and dX.
    @triton.jit
    def _kron_apply_kernel(
        x_ptr, p_ptr, q_ptr, y_ptr, n_tokens, rank, dp, dq, dm, dn,
        stride_xt, stride_xp, stride_xq,
        stride_pr, stride_pm, stride_pp,
        stride_qr, stride_qn, stride_qq,
        stride_yt, stride_ym, stride_yn,
        BLOCK_T: tl.constexpr, PP: tl.constexpr, QP: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        t0 = tl.program_id(0) * BLOCK_T
        # X as [p, (t, q)]
        offs_p = tl.arange(0, PP)
        offs_tq = tl.arange(0, BLOCK_T * QP)
        tok = t0 + offs_tq // QP
        q = offs_tq % QP
        x_ptrs = (x_ptr + tok.to(tl.int64)[None, :] * stride_xt + offs_p[:, None] * stride_xp
                  + q[None, :] * stride_xq)
        x_mask = (offs_p[:, None] < dp) & ((tok < n_tokens) & (q < dq))[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)

        offs_m = tl.arange(0, MP)
        offs_n = tl.arange(0, NP)
        offs_q = tl.arange(0, QP)
        p_mask = (offs_m[:, None] < dm) & (offs_p[None, :] < dp)
        qt_mask = (offs_q[:, None] < dq) & (offs_n[None, :] < dn)
        acc = tl.zeros((MP * BLOCK_T, NP), dtype=tl.float32)
        for i in range(rank):
            p = tl.load(p_ptr + i * stride_pr + offs_m[:, None] * stride_pm + offs_p[None, :] * stride_pp,
                        mask=p_mask, other=0.0).to(dtype)
            qt = tl.load(q_ptr + i * stride_qr + offs_q[:, None] * stride_qq + offs_n[None, :] * stride_qn,
                         mask=qt_mask, other=0.0).to(dtype)  # Q_i^T as [q, n]
            t = tl.dot(p, x, input_precision=PRECISION)  # [m, (t, q)]
            t = tl.reshape(t, (MP * BLOCK_T, QP)).to(dtype)  # [(m, t), q]
            acc = tl.dot(t, qt, acc, input_precision=PRECISION)  # [(m, t), n]

        offs_mt = tl.arange(0, MP * BLOCK_T)
        m = offs_mt // BLOCK_T
        tok = t0 + offs_mt % BLOCK_T
        y_ptrs = (y_ptr + tok.to(tl.int64)[:, None] * stride_yt + m[:, None] * stride_ym
                  + offs_n[None, :] * stride_yn)
        y_mask = ((tok < n_tokens) & (m < dm))[:, None] & (offs_n[None, :] < dn)
        tl.store(y_ptrs, acc.to(dtype), mask=y_mask)

    # Partial dA_i = sum_t (dY_t B_i) X_t^T and dB_i = sum_t dY_t^T (A_i X_t) over this program's token
    # blocks; per token and rank 4*m1*k2*(m2+k1) FLOPs, (k1*k2 + m1*m2) * elt bytes (x, dy reread per rank).
    # Grid (programs, rank); each program strides over token blocks and writes one fp32 partial, so the
    # reduction over tokens is a deterministic .sum(0) on the host (no atomics).
    @triton.jit
    def _kron_weight_grad_kernel(
        x_ptr, dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_tokens, m1, k1, m2, k2,
        stride_xt, stride_xf, stride_yt, stride_yf,
        stride_ar, stride_am, stride_ak, stride_br, stride_bm, stride_bk,
        BLOCK_T: tl.constexpr, M1P: tl.constexpr, K1P: tl.constexpr, M2P: tl.constexpr, K2P: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        i = tl.program_id(1)
        n_programs = tl.num_programs(0)

        offs_m1 = tl.arange(0, M1P)
        offs_k1 = tl.arange(0, K1P)
        offs_m2 = tl.arange(0, M2P)
        offs_k2 = tl.arange(0, K2P)
        a_mask = (offs_m1[:, None] < m1) & (offs_k1[None, :] < k1)
        b_mask = (offs_m2[:, None] < m2) & (offs_k2[None, :] < k2)
        a = tl.load(a_ptr + i * stride_ar + offs_m1[:, None] * stride_am + offs_k1[None, :] * stride_ak,
                    mask=a_mask, other=0.0).to(dtype)
        b = tl.load(b_ptr + i * stride_br + offs_m2[:, None] * stride_bm + offs_k2[None, :] * stride_bk,
                    mask=b_mask, other=0.0).to(dtype)

        # token-block-relative index layouts: X as [(t, d), c], dY as [(a, t), b]
        offs_td = tl.arange(0, BLOCK_T * K2P)
        t_x = offs_td // K2P
        d = offs_td % K2P
        offs_at = tl.arange(0, M1P * BLOCK_T)
        a_row = offs_at // BLOCK_T
        t_dy = offs_at % BLOCK_T

        acc_a = tl.zeros((M1P, K1P), dtype=tl.float32)
        acc_b = tl.zeros((M2P, K2P), dtype=tl.float32)
        for blk in range(pid, tl.cdiv(n_tokens, BLOCK_T), n_programs):
            tok_x = blk * BLOCK_T + t_x
            x_mask = ((tok_x < n_tokens) & (d < k2))[:, None] & (offs_k1[None, :] < k1)
            feat_x = (offs_k1[None, :] * k2 + d[:, None]).to(tl.int64)
            x = tl.load(x_ptr + tok_x.to(tl.int64)[:, None] * stride_xt + feat_x * stride_xf,
                        mask=x_mask, other=0.0)
            tok_dy = blk * BLOCK_T + t_dy
            dy_mask = ((tok_dy < n_tokens) & (a_row < m1))[:, None] & (offs_m2[None, :] < m2)
            feat_dy = (a_row[:, None] * m2 + offs_m2[None, :]).to(tl.int64)
            dy = tl.load(dy_ptr + tok_dy.to(tl.int64)[:, None] * stride_yt + feat_dy * stride_yf,
                         mask=dy_mask, other=0.0).to(dtype)

            v = tl.dot(dy, b, input_precision=PRECISION)  # V = dY B_i as [(a, t), d]
            v = tl.reshape(v, (M1P, BLOCK_T * K2P)).to(dtype)  # [a, (t, d)]
            acc_a = tl.dot(v, x, acc_a, input_precision=PRECISION)  # [a, c]
            t = tl.dot(a, tl.trans(x), input_precision=PRECISION)  # T = A_i X as [a, (t, d)]
            t = tl.reshape(t, (M1P * BLOCK_T, K2P)).to(dtype)  # [(a, t), d]
            acc_b = tl.dot(tl.trans(dy), t, acc_b, input_precision=PRECISION)  # [b, d]

        part = pid * tl.num_programs(1) + i
        tl.store(da_ptr + part * m1 * k1 + offs_m1[:, None] * k1 + offs_k1[None, :], acc_a, mask=a_mask)
        tl.store(db_ptr + part * m2 * k2 + offs_m2[:, None] * k2 + offs_k2[None, :], acc_b, mask=b_mask)


def _precision(dtype):
    # fp32 inputs get exact fp32 products, not tf32 (tests compare against torch); 16-bit inputs ignore this.
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def _kron_apply_triton(x, A, B, a_first=None):
    """Y_t = sum_i A_i X_t B_i^T for x (N, k1*k2), A (r, m1, k1), B (r, m2, k2), any strides (no copies)."""
    y, launch = _kron_apply_plan(x, A, B, a_first)
    if launch is not None:
        launch()
    return y


def _kron_apply_plan(x, A, B, a_first=None, config=None):
    """(y, KernelLaunch or None for no tokens) of _kron_apply_triton, y allocated, nothing launched. config: one
    of the launch's space (None: the config table's choice for x's device, else the default)."""
    n = x.shape[0]
    r, m1, k1 = A.shape
    _, m2, k2 = B.shape
    y = torch.empty(n, m1 * m2, device=x.device, dtype=x.dtype)
    if n == 0:
        return y, None
    if a_first is None:
        a_first = _a_first(m1, k1, m2, k2)
    # The kernel always contracts its P factor first; B-first is the transposed problem Y^T = B X^T A^T,
    # expressed through strides alone (x's feature stride s puts X[c, d] at (c*k2 + d)*s).
    s = x.stride(1)
    if a_first:
        P, Q, (dp, dq, dm, dn) = A, B, (k1, k2, m1, m2)
        sx, sy = (k2 * s, s), (m2, 1)
    else:
        P, Q, (dp, dq, dm, dn) = B, A, (k2, k1, m2, m1)
        sx, sy = (s, k2 * s), (1, m2)
    PP, QP, MP, NP = _pad(dp), _pad(dq), _pad(dm), _pad(dn)
    per_token = max(PP * QP, MP * QP, MP * NP)
    key = f"kron_apply {'A' if a_first else 'B'}-first p{dp} q{dq} m{dm} n{dn} r{r} {_dtype_name(x.dtype)}"
    space = _kron_space(per_token, token_loop=False)
    cfg = _config_for(config, key, space, x.device)
    grid = (triton.cdiv(n, cfg.block),)
    return y, KernelLaunch(
        _kron_apply_kernel, (x, P, Q, y, n, r, dp, dq, dm, dn,
                             x.stride(0), *sx, *P.stride(), *Q.stride(), y.stride(0), *sy),
        dict(BLOCK_T=cfg.block, PP=PP, QP=QP, MP=MP, NP=NP, PRECISION=_precision(x.dtype)), grid,
        cfg.num_warps, cfg.num_stages, key, cfg, space,
    )


def _kron_weight_grad_triton(x, dy, A, B, num_programs=None):
    """(dA, dB) in fp32 for x (N, K), dy (N, M), any strides (no copies). num_programs fixes the reduction split."""
    (da, db), launch = _kron_weight_grad_plan(x, dy, A, B, num_programs)
    launch()
    return da.sum(0), db.sum(0)


def _kron_weight_grad_plan(x, dy, A, B, num_programs=None, sms=None, config=None):
    """((dA partials, dB partials), KernelLaunch) of _kron_weight_grad_triton, nothing launched; sms (streaming
    multiprocessors, for the default split) defaults to x's GPU's count (4 off a GPU); config as _kron_apply_plan."""
    n = x.shape[0]
    r, m1, k1 = A.shape
    _, m2, k2 = B.shape
    M1P, K1P, M2P, K2P = _pad(m1), _pad(k1), _pad(m2), _pad(k2)
    per_token = max(K1P * K2P, M1P * M2P, M1P * K2P)
    key = f"kron_weight_grad m1={m1} k1={k1} m2={m2} k2={k2} r{r} {_dtype_name(x.dtype)}"
    space = _kron_space(per_token, token_loop=True)
    cfg = _config_for(config, key, space, x.device)
    block_t = cfg.block
    n_blocks = triton.cdiv(n, block_t)
    if num_programs is None:
        # a few programs per SM keep the GPU busy while the partial buffers stay small
        if sms is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        num_programs = 4 * sms
    num_programs = max(1, min(num_programs, n_blocks))
    da = torch.empty(num_programs, r, m1, k1, device=x.device, dtype=torch.float32)
    db = torch.empty(num_programs, r, m2, k2, device=x.device, dtype=torch.float32)
    return (da, db), KernelLaunch(
        _kron_weight_grad_kernel,
        (x, dy, A, B, da, db, n, m1, k1, m2, k2, *x.stride(), *dy.stride(), *A.stride(), *B.stride()),
        dict(BLOCK_T=block_t, M1P=M1P, K1P=K1P, M2P=M2P, K2P=K2P, PRECISION=_precision(x.dtype)),
        (num_programs, r), cfg.num_warps, cfg.num_stages, key, cfg, space,
    )


# -----------------------------------------------------------------------------
# Custom ops and autograd
#
# torch.compile cannot trace a Triton launch under the interpreter and would graph-break around one inside an
# autograd.Function, so each launch is a custom op: opaque to the compiler, with a fake-tensor function for
# shapes. The ops take any strides (the kernels get them as arguments), so they never copy their inputs.

@torch.library.custom_op("kernels::kron_apply", mutates_args=())
def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Y_t = sum_i A_i X_t B_i^T: x (N, k1*k2), A (r, m1, k1), B (r, m2, k2) -> (N, m1*m2) in x.dtype."""
    return _kron_apply_triton(x, A, B)


@kron_apply.register_fake
def _(x, A, B):
    return x.new_empty(x.shape[0], A.shape[1] * B.shape[1])


@torch.library.custom_op("kernels::kron_weight_grad", mutates_args=())
def kron_weight_grad(x: torch.Tensor, dy: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     num_programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, dB) in fp32 of kron_apply(x, A, B) for the output grad dy (N, m1*m2)."""
    return _kron_weight_grad_triton(x, dy, A, B, num_programs)


@kron_weight_grad.register_fake
def _(x, dy, A, B, num_programs=None):
    return (torch.empty(A.shape, device=x.device, dtype=torch.float32),
            torch.empty(B.shape, device=x.device, dtype=torch.float32))


def _kron_apply_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kron_apply_backward(ctx, dy):
    # dX is the same op on the transposed factors; factor grads are accumulated in fp32 and returned in the
    # factors' dtype (A, B may be fp32 while x is bf16: the kernels cast factors on load).
    x, A, B = ctx.saved_tensors
    dx = dA = dB = None
    if ctx.needs_input_grad[0]:
        dx = kron_apply(dy, A.transpose(1, 2), B.transpose(1, 2))
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dA, dB = kron_weight_grad(x, dy, A, B)
        dA, dB = dA.to(A.dtype), dB.to(B.dtype)
    return dx, dA, dB


kron_apply.register_autograd(_kron_apply_backward, setup_context=_kron_apply_setup_context)


def kron_apply_launches(x, A, B, sms=None, configs=None):
    """(y, {"forward", "dx", "weight_grad": KernelLaunch}) of one kron_apply forward and backward on x (N, K), as
    kron_apply and _kron_apply_backward launch them (dy taken contiguous), nothing run: tensors may be on the meta
    device (tools/preflight.py --aot). sms: as _kron_weight_grad_plan. configs: {kind: KernelConfig} for kinds
    that take that entry of their launch's .space instead of the launchers' choice (every_config enumerates them).
    No tokens: no launches."""
    configs = configs or {}
    y, forward = _kron_apply_plan(x, A, B, config=configs.get("forward"))
    if forward is None:
        return y, {}
    dy = torch.empty_like(y)
    _, dx = _kron_apply_plan(dy, A.transpose(1, 2), B.transpose(1, 2), config=configs.get("dx"))
    _, weight_grad = _kron_weight_grad_plan(x, dy, A, B, sms=sms, config=configs.get("weight_grad"))
    return y, {"forward": forward, "dx": dx, "weight_grad": weight_grad}


def every_config(launches_fn, *args, **kwargs):
    """{kind: [KernelLaunch for each config of that launch's space, the default first]} of kron_apply_launches or
    ks_apply_launches called with these arguments (tools/preflight.py --aot compiles them all)."""
    _, chosen = launches_fn(*args, **kwargs)
    return {kind: [launches_fn(*args, **kwargs, configs={kind: c})[1][kind] for c in launch.space]
            for kind, launch in chosen.items()}


# -----------------------------------------------------------------------------
# Module and factor arithmetic

IMPLS = ("auto", "triton", "torch", "dense")


def kron_param_count(m1, k1, m2, k2, rank=1):
    return rank * (m1 * k1 + m2 * k2)


def kron_macs_per_token(m1, k1, m2, k2, rank=1):
    """Forward multiply-accumulates per token with the cheaper contraction order (dense: m1*m2*k1*k2)."""
    return rank * min(m1 * k2 * (k1 + m2), k1 * m2 * (k2 + m1))


def _balanced_splits(n):
    """The factor pairs (d, n // d) of n closest to (sqrt(n), sqrt(n)), both orders."""
    d = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(math.log(d * d / n)))
    return sorted({(d, n // d), (n // d, d)})


def choose_kron_factors(in_features, out_features, rank=1):
    """(m1, k1, m2, k2) for a KronLinear(in_features, out_features).

    Raw MAC count alone would pick degenerate factors (m1 = k2 = 1 makes W a rank-r outer product), so
    each of in/out is split as close to square as its divisors allow; among those (at most four) choices
    the fewest MACs per token win, then the fewest MACs after padding to the kernels' power-of-two tiles.
    MACs scale linearly in rank, so the choice does not depend on it.
    """
    candidates = [(m1, k1, m2, k2) for m1, m2 in _balanced_splits(out_features)
                  for k1, k2 in _balanced_splits(in_features)]
    return min(candidates, key=lambda f: (kron_macs_per_token(*f, rank),
                                          kron_macs_per_token(*map(_pad, f), rank), f))


def _check_triton_usable(x):
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package, which is not importable; "
                           "use impl='torch' (or 'dense' for debugging)")
    if not x.is_cuda and not TRITON_INTERPRET:
        raise RuntimeError(f"impl='triton' got a {x.device.type} tensor; Triton needs CUDA tensors or "
                           "TRITON_INTERPRET=1 set before triton is imported; use impl='torch' (or 'dense')")


def kron_linear(x, A, B, impl="auto"):
    """y = x W^T with W = sum_i kron(A_i, B_i); x (..., K) of any float dtype, factors cast to x.dtype."""
    if impl == "auto":
        impl = "triton" if HAS_TRITON and x.is_cuda else "torch"
    if impl == "triton":
        _check_triton_usable(x)
        y = kron_apply(x.reshape(-1, A.shape[2] * B.shape[2]), A, B)
        return y.reshape(*x.shape[:-1], y.shape[1])
    A, B = A.to(x.dtype), B.to(x.dtype)
    if impl == "torch":
        return kron_linear_ref(x, A, B)
    if impl == "dense":
        return F.linear(x, kron_dense_weight(A, B))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


@torch.no_grad()
def kron_factor_init_(A, B, zero_init=False):
    """Initialize factors A (..., rank, m1, k1), B (..., rank, m2, k2) in place (leading dims: stacked layers).

    Match the speedrun's dense init, Var(W) = (0.5 / sqrt(in))^2. Var(W) = rank * Var(A) * Var(B), and each factor
    gets the fan-in scaling of its own contraction (k1 or k2), so both stages of A X B^T keep activations O(1):
    Var(A) = g^2 / k1, Var(B) = g^2 / k2 with g^4 = 0.25 / rank. zero_init zeroes B only (see KronLinear).
    """
    g = (0.25 / A.shape[-3]) ** 0.25
    for p in (A, B):
        bound = math.sqrt(3) * g / math.sqrt(p.shape[-1])  # uniform(-b, b) has std b / sqrt(3)
        p.uniform_(-bound, bound)
    if zero_init:
        B.zero_()


class KronLinear(nn.Module):
    """Bias-free linear layer with W = sum_{i<rank} kron(A_i, B_i); A (rank, m1, k1), B (rank, m2, k2).

    The state dict is the same for every impl. zero_init=True zeroes B and keeps A random: dB = dY^T (A X)
    is then non-zero, so B learns first; zeroing both would make every factor gradient zero forever.
    """

    draws_own_init = True  # train_gpt's --weight_init leaves the factors alone (their own fan-in rule)

    def __init__(self, in_features, out_features, rank=1, factors=None, impl="auto", zero_init=False):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if factors is None:
            factors = choose_kron_factors(in_features, out_features, rank)
        m1, k1, m2, k2 = factors
        if m1 * m2 != out_features or k1 * k2 != in_features:
            raise ValueError(f"factors (m1, k1, m2, k2)={tuple(factors)} need m1*m2 == out_features and "
                             f"k1*k2 == in_features, got {m1 * m2} vs {out_features} and "
                             f"{k1 * k2} vs {in_features}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.factors, self.impl, self.zero_init = (m1, k1, m2, k2), impl, zero_init
        self.A = nn.Parameter(torch.empty(rank, m1, k1))
        self.B = nn.Parameter(torch.empty(rank, m2, k2))
        self.reset_parameters()

    def reset_parameters(self):
        kron_factor_init_(self.A, self.B, self.zero_init)

    def macs_per_token(self) -> int:
        """Multiply-accumulates per input row of the factored contraction (kron_macs_per_token)."""
        return kron_macs_per_token(*self.factors, self.rank)

    def forward(self, x):
        return kron_linear(x, self.A, self.B, self.impl)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"factors={self.factors}, impl={self.impl!r}, zero_init={self.zero_init}")


# -----------------------------------------------------------------------------
# Van Loan nearest Kronecker product

def van_loan_decompose(W, m1, k1, m2, k2, rank=1):
    """(A, B) minimizing ||W - sum_{i<rank} kron(A_i, B_i)||_F (Van Loan & Pitsianis).

    W[a*m2 + b, c*k2 + d] = sum_i A_i[a, c] B_i[b, d], so the rearrangement R[(a, c), (b, d)] is
    sum_i vec(A_i) vec(B_i)^T and the best rank-r fit is R's truncated SVD; sqrt(s_i) goes to each factor.
    """
    M, K = W.shape
    if m1 * m2 != M or k1 * k2 != K:
        raise ValueError(f"factors ({m1}, {k1}, {m2}, {k2}) do not tile W of shape {tuple(W.shape)}")
    if not 1 <= rank <= min(m1 * k1, m2 * k2):
        raise ValueError(f"rank must be in [1, {min(m1 * k1, m2 * k2)}], got {rank}")
    R = W.reshape(m1, m2, k1, k2).permute(0, 2, 1, 3).reshape(m1 * k1, m2 * k2)
    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    s = S[:rank].sqrt()
    A = (U[:, :rank] * s).T.reshape(rank, m1, k1)
    B = (Vh[:rank] * s[:, None]).reshape(rank, m2, k2)
    return A.to(W.dtype), B.to(W.dtype)


# =============================================================================
# Kronecker-sparse (KS) factors and chains
#
# A KS factor with pattern (a, b, c, d) has support I_a (x) 1_{b x c} (x) I_d: it maps in = a*c*d features to
# out = a*b*d features, and its a*b*c*d nonzeros are stored as a weight (a*d, b, c). With the input index
# (i, k, l) and the output index (i, j, l) read row-major (i < a, j < b, k < c, l < d), group g = i*d + l is
# an independent b x c block:
#     y[(i, j, l)] = sum_k w[i*d + l, j, k] x[(i, k, l)].
# A chain applies factors in list order (patterns[0] first), so the chain's dense matrix is
# W_L ... W_2 W_1, and consecutive patterns must satisfy a_l*b_l*d_l == a_{l+1}*c_{l+1}*d_{l+1}. A DFT of
# size 2^L is the chain (2^(l-1), 2, 2, 2^(L-l)), l = 1..L, followed by the bit-reversal permutation
# (decimation in frequency; see tests/kernels/test_kernels_ks.py).
# Layouts: batch-size-first x (N, in), or batch-size-last x (in, N), where every permutation moves whole
# contiguous rows of N tokens.

# -----------------------------------------------------------------------------
# KS plain-torch references ("bmm")

def ks_in_features(pattern):
    a, _, c, d = pattern
    return a * c * d


def ks_out_features(pattern):
    a, b, _, d = pattern
    return a * b * d


def ks_weight_shape(pattern):
    a, b, c, d = pattern
    return (a * d, b, c)


def ks_factor_ref(x, weight, pattern, bs_last=False):
    """One KS factor by permute + torch.bmm (autograd through torch). x (N, in), or (in, N) when bs_last."""
    # Each permutation is an explicit copy: reshape may otherwise return a strided view, on which CPU bmm
    # was measured 3x (one thread) to several 100x (two busy threads) slower than copy + contiguous bmm.
    a, b, c, d = pattern
    if bs_last:
        n = x.shape[1]
        xg = x.reshape(a, c, d, n).transpose(1, 2).contiguous().view(a * d, c, n)  # moves rows of n tokens
        yg = torch.bmm(weight, xg)  # (a*d, b, N)
        return yg.view(a, d, b, n).transpose(1, 2).contiguous().view(a * b * d, n)
    n = x.shape[0]
    xg = x.reshape(n, a, c, d).permute(1, 3, 0, 2).contiguous().view(a * d, n, c)
    yg = torch.bmm(xg, weight.transpose(1, 2))  # (a*d, N, b)
    return yg.view(a, d, n, b).permute(2, 0, 3, 1).contiguous().view(n, a * b * d)


def ks_dense_matrix(weight, pattern):
    """The dense (a*b*d, a*c*d) matrix of one factor, built from its support. For tests and debugging."""
    a, b, c, d = pattern
    w = weight.reshape(a, d, b, c)
    eye_a = torch.eye(a, dtype=weight.dtype, device=weight.device)
    eye_d = torch.eye(d, dtype=weight.dtype, device=weight.device)
    return torch.einsum("iljk,im,ln->ijlmkn", w, eye_a, eye_d).reshape(a * b * d, a * c * d)


def ks_chain_dense_matrix(weights, patterns):
    """W_L ... W_1 from the dense factor matrices, shape (out, in). For tests and debugging."""
    dense = None
    for w, p in zip(weights, patterns):
        m = ks_dense_matrix(w, p)
        dense = m if dense is None else m @ dense
    return dense


# -----------------------------------------------------------------------------
# KS Triton kernels
#
# One program owns one i, a run of BLOCK_D consecutive l (groups g = i*d + l .. + BLOCK_D-1), BLOCK_N tokens
# and BLOCK_B output rows of the b x c blocks. Its reduction index runs over (k, dl) and its output index over
# (j, dl), so the feature addresses (i*c + k)*d + l0 + dl come in runs of BLOCK_D contiguous features (a
# coalesced load when batch-size-first; batch-size-last is coalesced along tokens anyway). The BLOCK_D blocks
# are laid on the diagonal of a (BLOCK_C*BLOCK_D, BLOCK_B*BLOCK_D) weight tile (zeros elsewhere, by the load
# mask), so one tl.dot applies them all: BLOCK_D x wasted MACs buy tensor-core tiles of at least 16 even for
# 2 x 2 blocks. Both layouts are the same kernel: only the token and feature strides differ. Inputs are read
# in their dtype, the weight is cast to it on load, products accumulate in fp32.

def _next_pow2(n):
    return 1 << max(0, n - 1).bit_length()


def _ks_blocks(b, c, d):
    """(BLOCK_B, BLOCK_C, BLOCK_D): BLOCK_D blocks per tile so both tl.dot dims reach 16, tiles capped at 64."""
    bd = min(_next_pow2(d), max(1, 16 // min(_next_pow2(b), _next_pow2(c), 16)))
    bb = min(max(_next_pow2(b), 16 // bd), 64 // bd)
    bc = min(max(_next_pow2(c), 16 // bd), 64 // bd)
    return bb, bc, bd


def _ks_block_tokens(n):
    return min(64, max(16, _next_pow2(n)))


@functools.lru_cache(maxsize=None)  # asked at every launch; a pure function of its arguments
def _ks_space(n, token_loop):
    """The default (_ks_block_tokens: 64 tokens per program from 33 tokens on, 16 or 32 below; 4 warps; Triton's
    stages), then one step along each axis from 64 tokens and 4 warps: 32 tokens, 128 tokens with 8 warps (4 would
    hold 238-251 registers at GPT-2's Monarch shapes on sm_90), 8 warps; 2 stages for the weight grad (token_loop),
    the only kernel with a loop for Triton to pipeline (the apply kernel's loop over c is 1-2 steps long). The steps
    do not depend on n, so a table tuned at a training micro-batch stays valid at any token count."""
    steps = [KernelConfig(64, 4), KernelConfig(32, 4), KernelConfig(128, 8), KernelConfig(64, 8)]
    steps += [KernelConfig(64, 4, 2)] if token_loop else []
    return tuple(dict.fromkeys([KernelConfig(_ks_block_tokens(n), 4)] + steps))


def _ks_key(kind, pattern, bs_last, dtype):
    return f"{kind} ({','.join(map(str, pattern))}) {'bs_last' if bs_last else 'bs_first'} {_dtype_name(dtype)}"


if HAS_TRITON:

    # y[n, (i, j, l)] = sum_k w[i*d + l, j, k] x[n, (i, k, l)]; per token 2*a*b*c*d FLOPs (BLOCK_D x that
    # issued), (in + out) * elt bytes (the weight stays in cache). Forward, and dX with the transposed pattern.
    @triton.jit
    def _ks_apply_kernel(
        x_ptr, w_ptr, y_ptr, n_tokens, b, c, d,
        stride_xn, stride_xf, stride_wg, stride_wb, stride_wc, stride_yn, stride_yf,
        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        n_dblocks = tl.cdiv(d, BLOCK_D)
        i = tl.program_id(1) // n_dblocks
        l0 = (tl.program_id(1) % n_dblocks) * BLOCK_D
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_tokens
        # reduction index (k, dl) and output index (j, dl)
        offs_kl = tl.arange(0, BLOCK_C * BLOCK_D)
        k_rel = offs_kl // BLOCK_D
        l_k = l0 + offs_kl % BLOCK_D
        offs_jl = tl.arange(0, BLOCK_B * BLOCK_D)
        j = tl.program_id(2) * BLOCK_B + offs_jl // BLOCK_D
        l_j = l0 + offs_jl % BLOCK_D
        jl_mask = (j < b) & (l_j < d)

        acc = tl.zeros((BLOCK_N, BLOCK_B * BLOCK_D), dtype=tl.float32)
        for k0 in range(0, c, BLOCK_C):
            k = k0 + k_rel
            kl_mask = (k < c) & (l_k < d)
            feat = ((i * c + k) * d + l_k).to(tl.int64)
            x = tl.load(x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + feat[None, :] * stride_xf,
                        mask=n_mask[:, None] & kl_mask[None, :], other=0.0)
            # block-diagonal weight tile [(k, dl), (j, dl')], zero where dl != dl'
            w_ptrs = (w_ptr + (i * d + l_k).to(tl.int64)[:, None] * stride_wg + j[None, :] * stride_wb
                      + k[:, None] * stride_wc)
            w_mask = kl_mask[:, None] & jl_mask[None, :] & (l_k[:, None] == l_j[None, :])
            w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(dtype)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)

        feat_y = ((i * b + j) * d + l_j).to(tl.int64)
        y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * stride_yn + feat_y[None, :] * stride_yf
        tl.store(y_ptrs, acc.to(dtype), mask=n_mask[:, None] & jl_mask[None, :])

    # Partial dw[g, j, k] = sum_n dy[n, (i, j, l)] x[n, (i, k, l)] over this program's token blocks; per token
    # 2*a*b*c*d FLOPs, (in + out) * elt bytes, reread once per (b, c) tile. Grid (programs, group tiles,
    # (b, c) tiles); each program strides over token blocks and writes one fp32 partial, so the reduction over
    # tokens is a deterministic .sum(0) on the host (no atomics).
    @triton.jit
    def _ks_weight_grad_kernel(
        x_ptr, dy_ptr, dw_ptr, n_tokens, b, c, d, part_stride,
        stride_xn, stride_xf, stride_yn, stride_yf,
        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        n_dblocks = tl.cdiv(d, BLOCK_D)
        i = tl.program_id(1) // n_dblocks
        l0 = (tl.program_id(1) % n_dblocks) * BLOCK_D
        n_ctiles = tl.cdiv(c, BLOCK_C)
        offs_jl = tl.arange(0, BLOCK_B * BLOCK_D)
        j = (tl.program_id(2) // n_ctiles) * BLOCK_B + offs_jl // BLOCK_D
        l_j = l0 + offs_jl % BLOCK_D
        jl_mask = (j < b) & (l_j < d)
        offs_kl = tl.arange(0, BLOCK_C * BLOCK_D)
        k = (tl.program_id(2) % n_ctiles) * BLOCK_C + offs_kl // BLOCK_D
        l_k = l0 + offs_kl % BLOCK_D
        kl_mask = (k < c) & (l_k < d)
        feat_y = ((i * b + j) * d + l_j).to(tl.int64)
        feat_x = ((i * c + k) * d + l_k).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_N)

        acc = tl.zeros((BLOCK_B * BLOCK_D, BLOCK_C * BLOCK_D), dtype=tl.float32)
        for blk in range(pid, tl.cdiv(n_tokens, BLOCK_N), n_programs):
            tok = blk * BLOCK_N + offs_t
            t_mask = tok < n_tokens
            tok = tok.to(tl.int64)
            dyt = tl.load(dy_ptr + feat_y[:, None] * stride_yf + tok[None, :] * stride_yn,
                          mask=jl_mask[:, None] & t_mask[None, :], other=0.0).to(dtype)  # [(j, dl), t]
            x = tl.load(x_ptr + tok[:, None] * stride_xn + feat_x[None, :] * stride_xf,
                        mask=t_mask[:, None] & kl_mask[None, :], other=0.0)  # [t, (k, dl)]
            acc = tl.dot(dyt, x, acc, input_precision=PRECISION)

        # only the diagonal (dl == dl') entries belong to a block
        g = (i * d + l_j).to(tl.int64)
        dw_ptrs = dw_ptr + pid.to(tl.int64) * part_stride + g[:, None] * b * c + j[:, None] * c + k[None, :]
        tl.store(dw_ptrs, acc, mask=jl_mask[:, None] & kl_mask[None, :] & (l_j[:, None] == l_k[None, :]))


def _ks_strides(t, bs_last):
    """(token stride, feature stride) of a 2-D activation, (in, N) when bs_last else (N, in), any strides."""
    return (t.stride(1), t.stride(0)) if bs_last else (t.stride(0), t.stride(1))


def _ks_apply_triton(x, weight, pattern, bs_last=False):
    """One KS factor for x (N, in), or (in, N) when bs_last, and weight (a*d, b, c); any strides (no copies)."""
    y, launch = _ks_apply_plan(x, weight, pattern, bs_last)
    if launch is not None:
        launch()
    return y


def _ks_apply_plan(x, weight, pattern, bs_last=False, config=None):
    """(y, KernelLaunch or None for no tokens) of _ks_apply_triton, y allocated, nothing launched; config as
    _kron_apply_plan."""
    a, b, c, d = pattern
    n = x.shape[1] if bs_last else x.shape[0]
    out = a * b * d
    y = torch.empty((out, n) if bs_last else (n, out), device=x.device, dtype=x.dtype)
    if n == 0:
        return y, None
    bb, bc, bd = _ks_blocks(b, c, d)
    key = _ks_key("ks_apply", pattern, bs_last, x.dtype)
    space = _ks_space(n, token_loop=False)
    cfg = _config_for(config, key, space, x.device)
    bn = cfg.block
    grid = (triton.cdiv(n, bn), a * triton.cdiv(d, bd), triton.cdiv(b, bb))
    return y, KernelLaunch(
        _ks_apply_kernel,
        (x, weight, y, n, b, c, d, *_ks_strides(x, bs_last), *weight.stride(), *_ks_strides(y, bs_last)),
        dict(BLOCK_N=bn, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, PRECISION=_precision(x.dtype)), grid,
        cfg.num_warps, cfg.num_stages, key, cfg, space,
    )


def _ks_weight_grad_triton(x, dy, pattern, bs_last=False, num_programs=None):
    """dw (a*d, b, c) in fp32 for x, dy in the given layout, any strides. num_programs fixes the reduction split."""
    part, launch = _ks_weight_grad_plan(x, dy, pattern, bs_last, num_programs)
    launch()
    return part.sum(0)


def _ks_weight_grad_plan(x, dy, pattern, bs_last=False, num_programs=None, sms=None, config=None):
    """(dw partials, KernelLaunch) of _ks_weight_grad_triton, nothing launched; sms as _kron_weight_grad_plan,
    config as _kron_apply_plan."""
    a, b, c, d = pattern
    n = x.shape[1] if bs_last else x.shape[0]
    bb, bc, bd = _ks_blocks(b, c, d)
    key = _ks_key("ks_weight_grad", pattern, bs_last, x.dtype)
    space = _ks_space(n, token_loop=True)
    cfg = _config_for(config, key, space, x.device)
    bn = cfg.block
    tiles = (a * triton.cdiv(d, bd), triton.cdiv(b, bb) * triton.cdiv(c, bc))
    n_blocks = triton.cdiv(n, bn)
    if num_programs is None:
        # about 4 programs per SM in all, and at most 64 partial copies of the weight
        if sms is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        num_programs = min(64, triton.cdiv(4 * sms, tiles[0] * tiles[1]))
    num_programs = max(1, min(num_programs, n_blocks))
    part = torch.zeros(num_programs, a * d, b, c, device=x.device, dtype=torch.float32)
    return part, KernelLaunch(
        _ks_weight_grad_kernel,
        (x, dy, part, n, b, c, d, a * b * c * d, *_ks_strides(x, bs_last), *_ks_strides(dy, bs_last)),
        dict(BLOCK_N=bn, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, PRECISION=_precision(x.dtype)),
        (num_programs, *tiles), cfg.num_warps, cfg.num_stages, key, cfg, space,
    )


# -----------------------------------------------------------------------------
# KS custom ops and autograd (opaque to torch.compile, as for the Kronecker ops above)

@torch.library.custom_op("kernels::ks_apply", mutates_args=())
def ks_apply(x: torch.Tensor, weight: torch.Tensor, pattern: list[int], bs_last: bool) -> torch.Tensor:
    """One KS factor: x (N, in), or (in, N) when bs_last, weight (a*d, b, c) -> (N, out) or (out, N) in x.dtype."""
    return _ks_apply_triton(x, weight, tuple(pattern), bs_last)


@ks_apply.register_fake
def _(x, weight, pattern, bs_last):
    a, b, _, d = pattern
    n = x.shape[1] if bs_last else x.shape[0]
    return x.new_empty((a * b * d, n) if bs_last else (n, a * b * d))


@torch.library.custom_op("kernels::ks_weight_grad", mutates_args=())
def ks_weight_grad(x: torch.Tensor, dy: torch.Tensor, pattern: list[int], bs_last: bool,
                   num_programs: int | None = None) -> torch.Tensor:
    """dw (a*d, b, c) in fp32 of ks_apply(x, w, pattern, bs_last) for the output grad dy (same layout as x)."""
    return _ks_weight_grad_triton(x, dy, tuple(pattern), bs_last, num_programs)


@ks_weight_grad.register_fake
def _(x, dy, pattern, bs_last, num_programs=None):
    a, b, c, d = pattern
    return torch.empty((a * d, b, c), device=x.device, dtype=torch.float32)


def _ks_apply_setup_context(ctx, inputs, output):
    x, weight, pattern, bs_last = inputs
    ctx.save_for_backward(x, weight)
    ctx.pattern, ctx.bs_last = tuple(pattern), bs_last


def _ks_apply_backward(ctx, dy):
    # dX is the transposed factor, pattern (a, c, b, d) with weight w^T (a view); dW sums dY_g^T X_g over tokens
    # per group g, in fp32, returned in the weight's dtype (it may be fp32 while x is bf16).
    x, weight = ctx.saved_tensors
    a, b, c, d = ctx.pattern
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = ks_apply(dy, weight.transpose(1, 2), [a, c, b, d], ctx.bs_last)
    if ctx.needs_input_grad[1]:
        dw = ks_weight_grad(x, dy, list(ctx.pattern), ctx.bs_last).to(weight.dtype)
    return dx, dw, None, None


ks_apply.register_autograd(_ks_apply_backward, setup_context=_ks_apply_setup_context)


def ks_apply_launches(x, weight, pattern, bs_last=False, sms=None, configs=None):
    """(y, {"forward", "dx", "weight_grad": KernelLaunch}) of one ks_apply forward and backward, as ks_apply and
    _ks_apply_backward launch them (dy taken contiguous), nothing run; sms, configs: see kron_apply_launches."""
    a, b, c, d = pattern
    configs = configs or {}
    y, forward = _ks_apply_plan(x, weight, tuple(pattern), bs_last, config=configs.get("forward"))
    if forward is None:
        return y, {}
    dy = torch.empty_like(y)
    _, dx = _ks_apply_plan(dy, weight.transpose(1, 2), (a, c, b, d), bs_last, config=configs.get("dx"))
    _, weight_grad = _ks_weight_grad_plan(x, dy, tuple(pattern), bs_last, sms=sms, config=configs.get("weight_grad"))
    return y, {"forward": forward, "dx": dx, "weight_grad": weight_grad}


# -----------------------------------------------------------------------------
# KS functional API, pattern helpers, module, loader

KS_IMPLS = ("auto", "triton", "bmm")


def check_ks_pattern(pattern):
    """The pattern as a tuple of four positive ints, or a ValueError."""
    p = tuple(pattern)
    if len(p) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p):
        raise ValueError(f"a KS pattern is four positive ints (a, b, c, d), got {pattern!r}")
    return p


def check_ks_chain(patterns):
    """Validate that the patterns chain up (out of factor l == in of factor l+1); returns them as tuples."""
    patterns = [check_ks_pattern(p) for p in patterns]
    if not patterns:
        raise ValueError("a KS chain needs at least one pattern")
    for l, (p, q) in enumerate(zip(patterns, patterns[1:])):
        if ks_out_features(p) != ks_in_features(q):
            raise ValueError(f"KS patterns do not chain: pattern {l} {p} outputs a*b*d={ks_out_features(p)} "
                             f"features but pattern {l + 1} {q} takes a*c*d={ks_in_features(q)}")
    return tuple(patterns)


def ks_param_count(patterns):
    return sum(a * b * c * d for a, b, c, d in map(check_ks_pattern, patterns))


def _check_ks_triton_usable(x):
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package, which is not importable; use impl='bmm'")
    if not x.is_cuda and not TRITON_INTERPRET:
        raise RuntimeError(f"impl='triton' got a {x.device.type} tensor; Triton needs CUDA tensors or "
                           "TRITON_INTERPRET=1 set before triton is imported; use impl='bmm'")


def _resolve_ks_impl(impl, x):
    if impl not in KS_IMPLS:
        raise ValueError(f"impl must be one of {KS_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if HAS_TRITON and x.is_cuda else "bmm"
    if impl == "triton":
        _check_ks_triton_usable(x)
    return impl


def ks_factor(x, weight, pattern, impl="bmm", bs_last=False):
    """One KS factor. x (..., in) batch-size-first, or (in, ...) with bs_last; weight (a*d, b, c), cast to
    x.dtype (the Triton path casts on load). Returns (..., out), or (out, ...) with bs_last."""
    pattern = check_ks_pattern(pattern)
    if tuple(weight.shape) != ks_weight_shape(pattern):
        raise ValueError(f"weight of pattern {pattern} must have shape (a*d, b, c)={ks_weight_shape(pattern)}, "
                         f"got {tuple(weight.shape)}")
    n_in, n_out = ks_in_features(pattern), ks_out_features(pattern)
    feat_dim = 0 if bs_last else -1
    if x.dim() == 0 or x.shape[feat_dim] != n_in:
        raise ValueError(f"pattern {pattern} takes {n_in} features on dim {feat_dim} "
                         f"({'bs_last' if bs_last else 'batch-size-first'}), got x of shape {tuple(x.shape)}")
    impl = _resolve_ks_impl(impl, x)
    batch = x.shape[1:] if bs_last else x.shape[:-1]
    x2 = x.reshape(n_in, -1) if bs_last else x.reshape(-1, n_in)
    if impl == "triton":
        y = ks_apply(x2, weight, list(pattern), bs_last)
    else:
        y = ks_factor_ref(x2, weight.to(x.dtype), pattern, bs_last)
    return y.reshape(n_out, *batch) if bs_last else y.reshape(*batch, n_out)


def ks_chain(x, weights, patterns, impl="bmm", bs_last=False):
    """Apply factors in list order (patterns[0] first); same layouts as ks_factor."""
    for w, p in zip(weights, check_ks_chain(patterns), strict=True):
        x = ks_factor(x, w, p, impl, bs_last)
    return x


def _prime_factors(n):
    out, f = [], 2
    while f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    return out + [n] if n > 1 else out


def _split_into(n, count):
    """n as `count` factors, each >= 2 and as equal as the primes allow (largest first), or None if impossible."""
    primes = _prime_factors(n)
    if count > len(primes):
        return None
    parts = [1] * count
    for p in sorted(primes, reverse=True):  # largest prime into the currently smallest part
        parts[parts.index(min(parts))] *= p
    return sorted(parts, reverse=True)


def _widened_chain(p, q, rank):
    """Patterns of the chain that produces output digits p (outermost first) while consuming input digits q.

    Factor l contracts input digit q_l into output digit p_l: (prod p_<l, p_l * r_{l+1}, r_l * q_l, prod q_>l).
    Interface l (after factor l) carries an extra rank index r_l: r on odd interfaces, 1 on even ones (and at
    both ends), so each factor is widened in exactly one of b, c (the last one too when the chain length is
    even) and the parameter count grows by about `rank`, not rank^2.
    """
    n = len(p)
    r = [1] + [rank if l % 2 == 1 else 1 for l in range(1, n)] + [1]
    return tuple((math.prod(p[:l]), p[l] * r[l + 1], r[l] * q[l], math.prod(q[l + 1:])) for l in range(n))


def _check_rank_compresses(patterns, out_features, in_features, rank, what):
    n_params = ks_param_count(patterns)
    if n_params >= out_features * in_features:
        ok = [r for r in range(1, rank) if ks_param_count(what(r)) < out_features * in_features]
        hint = f"use rank <= {max(ok)}" if ok else "no rank compresses it; use a dense layer or explicit patterns"
        raise ValueError(f"a rank-{rank} chain for ({out_features}, {in_features}) has {n_params} parameters, "
                         f"not fewer than the dense {out_features * in_features}: {hint}")


def butterfly_patterns(out_features, in_features, rank=1, n_factors=None):
    """Butterfly chain for an (out_features, in_features) matrix: n_factors factors, factor l with blocks
    p_l x q_l where out = prod p, in = prod q (primes spread as evenly as possible, largest blocks first).

    Default n_factors: the number of factors of two in min(in, out) (so 2^L -> L factors of 2 x 2 blocks,
    the DFT chain, and 768 = 3 * 2^8 -> 8 factors, the 3 merged into one block), or its prime count if odd,
    at most the prime count of each side. rank widens the chain (see _widened_chain); params ~ rank.
    Raises ValueError where no chain of >= 2 factors exists or the chain has as many params as dense.
    """
    if rank < 1 or out_features < 1 or in_features < 1:
        raise ValueError(f"need rank, out_features, in_features >= 1, got {rank}, {out_features}, {in_features}")
    n_min = min(len(_prime_factors(out_features)), len(_prime_factors(in_features)))
    if n_factors is None:
        small = min(out_features, in_features)
        twos = (small & -small).bit_length() - 1
        n_factors = min(twos if twos >= 2 else len(_prime_factors(small)), n_min)
    p, q = _split_into(out_features, n_factors), _split_into(in_features, n_factors)
    if n_factors < 2 or p is None or q is None:
        raise ValueError(f"no butterfly chain of {n_factors} factors for ({out_features}, {in_features}): both "
                         f"sizes need at least that many prime factors and a chain at least 2 (valid n_factors: "
                         f"2..{n_min}); a single dense factor is pattern (1, {out_features}, {in_features}, 1)"
                         if n_min >= 2 else
                         f"no butterfly chain for ({out_features}, {in_features}): a size with fewer than 2 prime "
                         f"factors cannot be split; a single dense factor is pattern "
                         f"(1, {out_features}, {in_features}, 1)")
    patterns = _widened_chain(p, q, rank)
    _check_rank_compresses(patterns, out_features, in_features, rank, lambda r: _widened_chain(p, q, r))
    return patterns


def monarch_patterns(out_features, in_features, rank=1, splits=None):
    """Two-factor (Monarch) chain: (1, m1*r, k1, k2), (m1, m2, r*k2, 1) for out = m1*m2, in = k1*k2.

    The first factor mixes input digit k1 into m1 (and r rank channels) per k2; the second mixes (r, k2) into
    m2 per m1. params = r * m1 * k2 * (k1 + m2). Without splits ((m1, m2), (k1, k2)), each size is split as
    close to square as its divisors allow and the split with the fewest params wins: 768 -> 3072 gives
    (1, 48r, 32, 24), (48, 64, 24r, 1), 110592 * r params (dense 2359296).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if splits is None:
        candidates = [((m1, m2), (k1, k2)) for m1, m2 in _balanced_splits(out_features)
                      for k1, k2 in _balanced_splits(in_features)]
        splits = min(candidates, key=lambda s: (ks_param_count(_widened_chain(*s, 1)), s))
    (m1, m2), (k1, k2) = splits
    if m1 * m2 != out_features or k1 * k2 != in_features:
        raise ValueError(f"splits ((m1, m2), (k1, k2))={splits} need m1*m2 == {out_features} and "
                         f"k1*k2 == {in_features}")
    patterns = _widened_chain((m1, m2), (k1, k2), rank)
    _check_rank_compresses(patterns, out_features, in_features, rank,
                           lambda r: _widened_chain((m1, m2), (k1, k2), r))
    return patterns


class KSLinear(nn.Module):
    """Bias-free linear layer W = W_L ... W_1, a chain of KS factors; factor l is the parameter `factors.{l}`
    of shape (a*d, b, c) for patterns[l], applied in list order.

    forward takes (..., in_features) in every layout; bs_last=True transposes once to (in, N), runs the
    whole chain batch-size-last and transposes back. The state dict ({"factors.0", ...}) is the same for
    every impl and layout. Parameters may be fp32 with bf16 inputs: each impl casts them to x.dtype.
    """

    draws_own_init = True  # train_gpt's --weight_init leaves the factors alone (their own fan-in rule)

    def __init__(self, patterns, impl="bmm", bs_last=False, zero_init_last=False):
        super().__init__()
        if impl not in KS_IMPLS:
            raise ValueError(f"impl must be one of {KS_IMPLS}, got {impl!r}")
        self.patterns = check_ks_chain(patterns)
        self.in_features = ks_in_features(self.patterns[0])
        self.out_features = ks_out_features(self.patterns[-1])
        self.impl, self.bs_last, self.zero_init_last = impl, bs_last, zero_init_last
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(ks_weight_shape(p))) for p in self.patterns])
        self.reset_parameters()

    def reset_parameters(self):
        # Match the speedrun's dense init, uniform with std 0.5 / sqrt(in): E[y^2] = 0.25 E[x^2]. Each output
        # of factor l sums c_l terms, so with independent zero-mean factors Var(y) = prod_l c_l s_l^2 Var(x);
        # factor l gets std s_l = 0.25^(1/(2L)) / sqrt(c_l), fan-in scaling per factor and an equal share of
        # the 0.25. Then also E[W_ks[i, j]^2] = 0.25 / in, as for the dense init.
        gain = 0.25 ** (1 / (2 * len(self.patterns)))
        with torch.no_grad():
            for w, (_, _, c, _) in zip(self.factors, self.patterns):
                bound = math.sqrt(3) * gain / math.sqrt(c)  # uniform(-b, b) has std b / sqrt(3)
                w.uniform_(-bound, bound)
            if self.zero_init_last:
                # Only the last: its grad dY^T (input of the last factor) is non-zero, so it learns first and
                # then opens the path for the others; with every factor zero no factor ever gets a gradient.
                self.factors[-1].zero_()

    def forward(self, x):
        if not self.bs_last:
            return ks_chain(x, self.factors, self.patterns, self.impl)
        batch = x.shape[:-1]
        h = x.reshape(-1, self.in_features).t().contiguous()
        h = ks_chain(h, self.factors, self.patterns, self.impl, bs_last=True)
        return h.t().reshape(*batch, self.out_features)

    def dense_weight(self):
        """The (out, in) matrix W_ks, by applying the chain (bmm, batch-size-first) to the identity."""
        w0 = self.factors[0]
        eye = torch.eye(self.in_features, dtype=w0.dtype, device=w0.device)
        return ks_chain(eye, self.factors, self.patterns, "bmm").t()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, patterns={self.patterns}, "
                f"impl={self.impl!r}, bs_last={self.bs_last}, zero_init_last={self.zero_init_last}")


def load_ks_chain(path, impl=None, map_location="cpu"):
    """A KSLinear from a checkpoint written by tools/ks_fit.py (keys "patterns", "model_state_dict", "impl",
    "bs_last"); impl overrides the saved one (e.g. "bmm" to run a Triton-fitted chain on CPU)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    missing = [k for k in ("patterns", "model_state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a KS chain checkpoint: missing {missing}; found keys {sorted(ckpt)}")
    chain = KSLinear([tuple(p) for p in ckpt["patterns"]], impl=impl or ckpt.get("impl", "bmm"),
                     bs_last=bool(ckpt.get("bs_last", False)))
    chain.load_state_dict(ckpt["model_state_dict"])
    return chain
