"""CPU stand-ins for the GPU-only paths: compiled FlexAttention with flex_block_mask equals SDPA with the dense mask
(document layouts, windows, the short window, the --mot=cross+self byte stream) and catches corrupted block lists;
the compiled model with BlockMasks equals the eager dense path for every architecture option and does not recompile
when the window changes; the FP8 head matmul through torch._scaled_mm at the real head shape; one optimizer step of
the full-size model.

Uncompiled FlexAttention on CPU applies only the mask_mod and ignores the BlockMask's block lists, so every BlockMask
check here runs compiled (inductor compiles the FlexAttention forward on CPU; there is no backward)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import features.mot as mot_feature
import train_gpt as tg
from conftest import cpu_fp8_matmul_is_reference_only, randomize_zero_matrices, smoke_args, smoke_model

BLOCK = tg.BLOCK_SIZE
compiled_flex = torch.compile(flex_attention, dynamic=False)  # one compile per mask shape, shared by the module


def tokens(T, eot, seed=0):
    x = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(seed))
    x[list(eot)] = tg.EOT_TOKEN
    return x


def window(blocks):
    return torch.tensor(blocks, dtype=torch.int32)  # a tensor, as in training: a Python int would specialize


# EOT positions for a 1024-token sequence (8 blocks of 128)
LAYOUTS = {
    "mid_block": [0, 70, 200, 201, 390, 700],  # starts inside blocks, a one-token document, one spanning 3 blocks
    "block_starts": [0, 128, 384, 896],  # every document starts on a block boundary
    "single_doc": [0],
    "tiny_docs": list(range(0, 1024, 9)),  # 114 documents, all shorter than a block
    "mid_doc_start": [300, 301, 1000],  # the sequence begins inside a document (no EOT at 0)
}
WINDOWS = [(1, 0), (2, 0), (3, 0), (20, 0), (3, 1), (5, 1)]  # (window_blocks, halvings); 20 > the 8 blocks


def qkv(T=1024, heads=2, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, T, head_dim, generator=g) for _ in range(3)]


def flex_vs_sdpa(q, k, v, inputs, blocks, halvings=0, docs=None):
    bm = tg.flex_block_mask(inputs, window(blocks), docs=docs, halvings=halvings)
    dense = tg.dense_attention_mask(inputs, window(blocks), docs=docs, halvings=halvings)
    return compiled_flex(q, k, v, block_mask=bm, scale=0.2), tg.attend(q, k, v, dense, 0.2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_flex_attention_equals_sdpa(layout):
    q, k, v = qkv()
    inputs = tokens(1024, LAYOUTS[layout])
    for blocks, halvings in WINDOWS:
        flex, sdpa = flex_vs_sdpa(q, k, v, inputs, blocks, halvings)
        torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5, msg=f"window {blocks} >> {halvings}")


@pytest.mark.parametrize("bytes_per_token", [4, 8])
def test_compiled_flex_attention_on_the_byte_stream_equals_sdpa(bytes_per_token):
    """--mot=cross+self's CharSelfAttention masks T * S byte positions with docs given per position."""
    q, k, v = qkv(seed=1)
    inputs = tokens(1024 // bytes_per_token, [0, 19, 20, 77])  # documents start mid-block in byte positions
    docs = tg.document_ids(inputs).repeat_interleave(bytes_per_token)
    for blocks in (1, 2, 3):
        flex, sdpa = flex_vs_sdpa(q, k, v, docs, blocks, docs=docs)
        torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5, msg=f"window {blocks}")


@pytest.mark.parametrize("kv_heads,v_dim", [(1, 32), (2, 16)])
def test_compiled_flex_attention_with_gqa_and_wider_qk_equals_sdpa(kv_heads, v_dim):
    """--n_kv_heads (enable_gqa) and MLA's q/k wider than v in the compiled kernel."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 1024, 48, generator=g), torch.randn(1, kv_heads, 1024, 48, generator=g)
    v = torch.randn(1, kv_heads, 1024, v_dim, generator=g)
    inputs = tokens(1024, LAYOUTS["mid_block"])
    for blocks in (1, 3):
        flex = compiled_flex(q, k, v, block_mask=tg.flex_block_mask(inputs, window(blocks)), scale=0.2,
                             enable_gqa=True)
        sdpa = tg.attend(q, k, v, tg.dense_attention_mask(inputs, window(blocks)), 0.2)
        torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_compiled_char_self_attention_equals_dense(monkeypatch):
    """--mot=cross+self's byte self-attention module compiled with its BlockMask (documents split mid-token-block,
    the window of mot_self_window tokens) against its eager dense-mask forward."""
    pytest.importorskip("tiktoken")
    torch.manual_seed(0)
    attn = randomize_zero_matrices(mot_feature.CharSelfAttention(smoke_args("--mot=cross+self", "--bytes_per_token=8",
                                                                   "--mot_self_window=32"))).eval()
    assert attn.window_blocks == 2
    inputs = tokens(256, [0, 19, 20, 77, 200])
    chars = torch.randn(256, 8, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = attn(chars, inputs)
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
        out = torch.compile(attn, fullgraph=True, dynamic=False)(chars, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (ref - chars).abs().max() > 0.01  # the attention contributes


def corrupted(bm: BlockMask, q_block: int, how: str) -> BlockMask:
    """bm with q_block's last partial kv block dropped, or moved to the full list (its mask_mod then skipped)."""
    kv_num, kv_idx = bm.kv_num_blocks.clone(), bm.kv_indices.clone()
    full_num, full_idx = bm.full_kv_num_blocks.clone(), bm.full_kv_indices.clone()
    n, f = int(kv_num[0, 0, q_block]), int(full_num[0, 0, q_block])
    kv_num[0, 0, q_block] = n - 1
    if how == "partial_as_full":
        full_idx[0, 0, q_block, f] = kv_idx[0, 0, q_block, n - 1]
        full_num[0, 0, q_block] = f + 1
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=bm.mask_mod)


@pytest.mark.parametrize("how", ["drop_partial", "partial_as_full"])
def test_compiled_flex_attention_catches_a_corrupted_block_mask(how):
    q, k, v = qkv(seed=2)
    inputs = tokens(1024, LAYOUTS["mid_block"])
    bm = tg.flex_block_mask(inputs, window(3))
    q_block = 3  # rows 384..511 hold the documents from 201 and 390: kv blocks 1..3 partial, the diagonal last
    assert bm.kv_num_blocks[0, 0, q_block] >= 2
    good = compiled_flex(q, k, v, block_mask=bm, scale=0.2)
    bad = compiled_flex(q, k, v, block_mask=corrupted(bm, q_block, how), scale=0.2)
    rows = slice(q_block * BLOCK, (q_block + 1) * BLOCK)
    assert (bad[:, :, rows] - good[:, :, rows]).abs().max() > 0.01  # the comparison with SDPA would fail
    others = torch.ones(1024, dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(bad[:, :, others], good[:, :, others], rtol=0, atol=0)


# --- the compiled model: BlockMasks vs the eager dense path ---------------------------------------------------------

MODEL_LAYOUTS = [[0, 70, 200, 201, 390], [0, 128, 384], [300, 301], list(range(0, 512, 9))]  # 512 tokens
ARCHS = {
    "gqa": ["--n_kv_heads=1"],
    "mla": ["--mla_kv_rank=32", "--mla_q_rank=48", "--mla_rope_dim=16"],
    "moe": ["--moe_experts=4", "--moe_shared=1"],
    "mot_cross": ["--mot=cross"],
    "mot_cross_self": ["--mot=cross+self"],
    "kron": ["--kron_mlp=both", "--kron_impl=torch"],
    "ks": ["--ks_mlp=both", "--ks_impl=bmm"],
    "swiglu": ["--mlp_act=swiglu"],
    "tied": ["--tie_embeddings=true"],
}


def compiled_vs_eager(flags, monkeypatch, windows=(1, 2, 3), layouts=MODEL_LAYOUTS, bf16_embeddings=False):
    """Eval logits of torch.compile(model, fullgraph=True) with FLEX_ATTENTION_ON_CPU and of the eager dense-mask
    model for every layout and window, and the compile counter (frame_count 1: one graph served every call)."""
    model = smoke_model(*flags).eval()
    if bf16_embeddings:  # as main() on GPU: bf16 embeddings make every activation bf16
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.bfloat16()
    cases = [(tokens(512, eot, seed=i), w) for i, eot in enumerate(layouts) for w in windows]
    with torch.no_grad():
        refs = [model(x, None, window(w)) for x, w in cases]
        torch._dynamo.reset()  # fresh caches: every architecture compiles GPT.forward anew
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
        outs = [compiled(x, None, window(w)) for x, w in cases]
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", False)
    return outs, refs, counter


def test_compiled_baseline_equals_eager_and_never_recompiles_for_the_window(monkeypatch):
    outs, refs, counter = compiled_vs_eager([], monkeypatch)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1  # windows 1, 2, 3 and four layouts: one graph
    assert not torch.allclose(refs[0], refs[1])  # the window matters for these inputs


# Every variant compiles for ~35 s, so all run with --slow (CI budget); the baseline above and preflight's
# model_flex_forward cover the default, the kernel-level tests cover GQA and MLA's q/k wider than v.
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_compiled_architecture_equals_eager(arch, monkeypatch):
    if arch.startswith("mot"):
        pytest.importorskip("tiktoken")
    # torch._grouped_mm's meta function (CUDA semantics) takes bf16 only, so MoE compiles in the GPU's dtypes
    bf16 = arch == "moe"
    outs, refs, counter = compiled_vs_eager(ARCHS[arch], monkeypatch, windows=(1, 3), bf16_embeddings=bf16)
    for out, ref in zip(outs, refs):
        if bf16:  # bf16 rounding (and the odd near-tie in routing) between two different attention kernels
            assert (out - ref).abs().mean() < 0.005 and (out - ref).abs().max() < 0.25  # measured 0.001, 0.015
        else:
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


# --- FP8 head matmul --------------------------------------------------------------------------------------------------

def relative_error(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("w_std", [0.02, 0.05])
def test_fp8_head_matmul_at_the_real_shape(w_std):
    """x (1024, 768) RMS-normed, a trained-head-like w (50304, 768), the gradient of the softcapped cross-entropy:
    e4m3 operands give ~3.8% (output) and e5m2 gradients ~3% (grads) relative error against fp32."""
    if cpu_fp8_matmul_is_reference_only():  # the op stays covered by tests/features/test_fp8_mlp.py, test_speed_paths
        pytest.skip("this CPU's oneDNN has no FP8 matmul kernel (reference path, ~25 MFLOP/s): three head-sized FP8 "
                    "products would take over an hour; runs on CPUs with one, and preflight's fp8_head on the GPU")
    torch.manual_seed(0)
    N, V, D = 1024, 50304, 768
    x0 = F.rms_norm(torch.randn(N, D), (D,))
    w0 = torch.randn(V, D) * w_std
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = x @ w.t()
    loss = F.cross_entropy(30 * torch.sigmoid(ref / 7.5), torch.randint(0, 50257, (N,)))
    g, = torch.autograd.grad(loss, ref, retain_graph=True)  # ~1/N at the targets, ~1/(N V) elsewhere
    ref.backward(g)
    x8, w8 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = tg.fp8_mm(x8, w8, **tg.FP8_HEAD_SCALES)[0]
    out.backward(g.to(out.dtype))
    assert out.dtype == torch.bfloat16 and out.shape == (N, V)
    for t in (out, x8.grad, w8.grad):
        assert t.isfinite().all()
    assert relative_error(out, ref) < 0.045
    assert relative_error(x8.grad, x.grad) < 0.04 and relative_error(w8.grad, w.grad) < 0.04


# --- the full-size model -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_model_optimizer_steps():
    """12 x 768, vocab 50304, default flags at a 256-token sequence: finite loss, every weight group moves, and
    the loss on the same batch falls over three steps."""
    torch.manual_seed(0)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--seq_len=256", "--micro_batches=1"])
    tg.check_config(args, 1)
    model = tg.build_model(args)
    optimizers = tg.build_optimizers(model, args)
    x = tokens(257, [0, 100])
    batch = [(x[:-1], x[1:])]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = [tg.train_step(model, optimizers, batch, 2, args, step, 1).item() for step in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(50304)) < 0.01  # the zero head: uniform over the padded vocabulary
    assert losses[2] < losses[0] - 0.5, losses
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name in ("lm_head.weight", "embed.weight", "blocks.0.attn.qkv_w", "blocks.11.mlp.c_proj.weight",
                 "blocks.5.lambdas", "skip_weights"):
        assert name in moved, name
