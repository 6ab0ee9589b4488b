"""Kronecker-factorized linear layers: plain-torch references, fused Triton kernels (forward and backward),
the autograd Function and nn.Module that wrap them, and the Van Loan nearest-Kronecker decomposition.

Convention (same as torch.kron): W (M x K) = sum_{i<r} kron(A_i, B_i) with A_i (m1, k1), B_i (m2, k2),
M = m1*m2, K = k1*k2. A token x (K,) viewed row-major as X (k1, k2) maps to Y = sum_i A_i X B_i^T (m1, m2),
flattened to (M,). Backward, with dY (m1, m2) and V_i = dY B_i:
    dX = sum_i A_i^T V_i,   dA_i = sum_tokens V_i X^T,   dB_i = sum_tokens dY^T (A_i X).

Importing this file has no side effects and works without triton (then HAS_TRITON is False and only the
torch paths are available).
"""
import math
import os

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


# Per-program register budget in elements of the largest fp32 tile; sets BLOCK_T. Not yet tuned on GPU.
_TILE_ELEMS = 8192


def _block_tokens(per_token_elems):
    return max(1, min(64, _TILE_ELEMS // per_token_elems))


def _launch_opts(tile_elems):
    return {"num_warps": 8 if tile_elems > 4096 else 4}


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
        stride_ar, stride_am, stride_ak, stride_br, stride_bm, stride_bk,
        BLOCK_T: tl.constexpr, M1P: tl.constexpr, K1P: tl.constexpr, M2P: tl.constexpr, K2P: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        i = tl.program_id(1)
        n_programs = tl.num_programs(0)
        K = k1 * k2
        M = m1 * m2

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
            x = tl.load(x_ptr + tok_x.to(tl.int64)[:, None] * K + offs_k1[None, :] * k2 + d[:, None],
                        mask=x_mask, other=0.0)
            tok_dy = blk * BLOCK_T + t_dy
            dy_mask = ((tok_dy < n_tokens) & (a_row < m1))[:, None] & (offs_m2[None, :] < m2)
            dy = tl.load(dy_ptr + tok_dy.to(tl.int64)[:, None] * M + a_row[:, None] * m2 + offs_m2[None, :],
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
    """Y_t = sum_i A_i X_t B_i^T for x (N, k1*k2) contiguous; A (r, m1, k1), B (r, m2, k2) may be strided views."""
    n = x.shape[0]
    r, m1, k1 = A.shape
    _, m2, k2 = B.shape
    y = torch.empty(n, m1 * m2, device=x.device, dtype=x.dtype)
    if n == 0:
        return y
    if a_first is None:
        a_first = _a_first(m1, k1, m2, k2)
    # The kernel always contracts its P factor first; B-first is the transposed problem Y^T = B X^T A^T,
    # expressed through strides alone.
    if a_first:
        P, Q, (dp, dq, dm, dn) = A, B, (k1, k2, m1, m2)
        sx, sy = (k2, 1), (m2, 1)
    else:
        P, Q, (dp, dq, dm, dn) = B, A, (k2, k1, m2, m1)
        sx, sy = (1, k2), (1, m2)
    PP, QP, MP, NP = _pad(dp), _pad(dq), _pad(dm), _pad(dn)
    per_token = max(PP * QP, MP * QP, MP * NP)
    block_t = _block_tokens(per_token)
    grid = (triton.cdiv(n, block_t),)
    _kron_apply_kernel[grid](
        x, P, Q, y, n, r, dp, dq, dm, dn,
        x.stride(0), *sx, *P.stride(), *Q.stride(), y.stride(0), *sy,
        BLOCK_T=block_t, PP=PP, QP=QP, MP=MP, NP=NP, PRECISION=_precision(x.dtype),
        **_launch_opts(block_t * per_token),
    )
    return y


def _kron_weight_grad_triton(x, dy, A, B, num_programs=None):
    """(dA, dB) in fp32 for x (N, K), dy (N, M) contiguous. num_programs fixes the reduction split."""
    n = x.shape[0]
    r, m1, k1 = A.shape
    _, m2, k2 = B.shape
    M1P, K1P, M2P, K2P = _pad(m1), _pad(k1), _pad(m2), _pad(k2)
    per_token = max(K1P * K2P, M1P * M2P, M1P * K2P)
    block_t = _block_tokens(per_token)
    n_blocks = triton.cdiv(n, block_t)
    if num_programs is None:
        # a few programs per SM keep the GPU busy while the partial buffers stay small
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        num_programs = 4 * sms
    num_programs = max(1, min(num_programs, n_blocks))
    da = torch.empty(num_programs, r, m1, k1, device=x.device, dtype=torch.float32)
    db = torch.empty(num_programs, r, m2, k2, device=x.device, dtype=torch.float32)
    _kron_weight_grad_kernel[(num_programs, r)](
        x, dy, A, B, da, db, n, m1, k1, m2, k2, *A.stride(), *B.stride(),
        BLOCK_T=block_t, M1P=M1P, K1P=K1P, M2P=M2P, K2P=K2P, PRECISION=_precision(x.dtype),
        **_launch_opts(block_t * per_token),
    )
    return da.sum(0), db.sum(0)


# -----------------------------------------------------------------------------
# Autograd Function

class KronLinearFunction(torch.autograd.Function):
    """y = x W^T, W = sum_i kron(A_i, B_i), with the Triton kernels. A, B may be fp32 while x is bf16:
    the kernels cast factors on load and return factor grads in the factors' dtype (accumulated in fp32)."""

    @staticmethod
    def forward(ctx, x, A, B):
        x2 = x.reshape(-1, A.shape[2] * B.shape[2]).contiguous()
        y = _kron_apply_triton(x2, A, B)
        ctx.save_for_backward(x2, A, B)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x2, A, B = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape[0], -1).contiguous()
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = _kron_apply_triton(dy2, A.transpose(1, 2), B.transpose(1, 2)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dA, dB = _kron_weight_grad_triton(x2, dy2, A, B)
            dA, dB = dA.to(A.dtype), dB.to(B.dtype)
        return dx, dA, dB


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
        return KronLinearFunction.apply(x, A, B)
    A, B = A.to(x.dtype), B.to(x.dtype)
    if impl == "torch":
        return kron_linear_ref(x, A, B)
    if impl == "dense":
        return F.linear(x, kron_dense_weight(A, B))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


class KronLinear(nn.Module):
    """Bias-free linear layer with W = sum_{i<rank} kron(A_i, B_i); A (rank, m1, k1), B (rank, m2, k2).

    The state dict is the same for every impl. zero_init=True zeroes B and keeps A random: dB = dY^T (A X)
    is then non-zero, so B learns first; zeroing both would make every factor gradient zero forever.
    """

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
        # Match the speedrun's dense init, Var(W) = (0.5 / sqrt(in))^2. Var(W) = rank * Var(A) * Var(B), and
        # each factor gets the fan-in scaling of its own contraction (k1 or k2), so both stages of A X B^T
        # keep activations O(1): Var(A) = g^2 / k1, Var(B) = g^2 / k2 with g^4 = 0.25 / rank.
        m1, k1, m2, k2 = self.factors
        g = (0.25 / self.rank) ** 0.25
        for p, fan_in in ((self.A, k1), (self.B, k2)):
            bound = math.sqrt(3) * g / math.sqrt(fan_in)  # uniform(-b, b) has std b / sqrt(3)
            with torch.no_grad():
                p.uniform_(-bound, bound)
        if self.zero_init:
            with torch.no_grad():
                self.B.zero_()

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
