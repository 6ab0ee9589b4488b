import os
import sys
from pathlib import Path

# Triton kernels run under the interpreter on CPU machines; the variable must be set before triton is imported.
# Set KERNEL_TESTS_ON_GPU=1 to run the kernel tests on a real GPU instead.
if os.environ.get("KERNEL_TESTS_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every launch takes its default config (kernels.KernelConfig) unless a test names a table: a tuned
# kernel_configs.json beside kernels.py, or one in the environment, changes no test.
os.environ["KERNEL_CONFIGS"] = "none"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_shared_cache = ROOT.parent / "shared" / "tiktoken_cache"
if _shared_cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared_cache))

import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def load_script(relpath: str):
    """Import a script that lives outside a package (data/*.py, tools/*.py)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory):
    """Tiny Shakespeare tokenized by data/tokenize_text.py: (train glob, val glob)."""
    if not SHAKESPEARE.exists() or not _shared_cache.is_dir():
        pytest.skip("../shared/data/tinyshakespeare.txt or ../shared/tiktoken_cache is missing")
    out = tmp_path_factory.mktemp("shakespeare")
    load_script("data/tokenize_text.py").main([str(SHAKESPEARE), "--out_dir", str(out), "--name", "shak",
                                               "--val_tokens", "16384"])
    return str(out / "shak_train_*.bin"), str(out / "shak_val_*.bin")


def write_shard(path, tokens):
    """A shard in the speedrun format: 256 int32 header (magic, version, count), then uint16 tokens."""
    import numpy as np
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def randomize_zero_matrices(model, std: float = 0.02):
    """Give every all-zero weight matrix (ndim >= 2: zero-initialized output projections, the untied lm_head, MoE
    proj_w, the zero Kronecker / KS factor) N(0, std) entries, so every path of the model carries signal: with them
    at zero, most of the computation cannot change the output and tests of it cannot fail."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, std)
    return model


def frontier_args(*flags):
    """--preset=frontier with flags, validated as train_gpt.main() would on 8 GPUs."""
    import train_gpt as tg
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier", *flags])
    tg.check_config(args, 8)
    return args


def smoke_args(*flags):
    """The smoke preset with flags, validated as train_gpt.main() would."""
    import train_gpt as tg
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", *flags])
    tg.check_config(args, 1)
    return args


def smoke_model(*flags, seed: int = 0, std: float = 0.02):
    """The smoke-preset model (fp32, CPU, training mode) with flags, built under torch.manual_seed(seed), its zero
    matrices randomized (randomize_zero_matrices)."""
    import torch
    import train_gpt as tg
    torch.manual_seed(seed)
    return randomize_zero_matrices(tg.build_model(smoke_args(*flags)), std)


def val_losses(log: str) -> list[float]:
    """The val_loss values of a training log (stdout or a record's log section), in order."""
    return [float(line.split("val_loss:")[1].split()[0]) for line in log.splitlines() if "val_loss:" in line]


def summary_of(log: str) -> dict:
    """The JSON of the `summary: ` line that ends every run's output."""
    last = log.strip().splitlines()[-1]
    assert last.startswith("summary: "), last
    return json.loads(last[len("summary: "):])


# Slow tests (compiled models, full-size shapes under the Triton interpreter) are skipped unless --slow is given;
# CI runs the default set (under 20 minutes), `python -m pytest -q tests --slow` runs everything.
def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless --slow is given")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def assert_future_never_changes_past(model, x, cut: int = 400):
    """Replacing tokens cut.. of x changes the logits from cut on and none before it (no look-ahead anywhere)."""
    import torch
    with torch.no_grad():
        logits = model(x)
        y = x.clone()
        y[cut:] = torch.randint(0, 50000, (len(x) - cut,), generator=torch.Generator().manual_seed(1))
        changed = model(y)
    torch.testing.assert_close(changed[:cut], logits[:cut])
    assert not torch.allclose(changed[cut:], logits[cut:])
    return logits


def cached_logits(model, x, window_blocks, prefill: int = 130):
    """Logits of x decoded through a KVCache: a prefill of `prefill` tokens, then one token per forward."""
    import torch
    import train_gpt as tg
    with torch.no_grad():
        cache = tg.KVCache()
        parts = [model.logits(model.hidden(x[:prefill], window_blocks, cache=cache))]
        parts += [model.logits(model.hidden(x[i:i + 1], window_blocks, cache=cache)) for i in range(prefill, len(x))]
    return torch.cat(parts)


def live_model(*flags, seed: int = 0):
    """Smoke model with flags, every all-zero parameter made random (matrices N(0, 0.02) as in
    randomize_zero_matrices, the zero scalars and vectors N(0, 0.5): gates, lambdas, alphas), so no path hides
    behind a zero."""
    import torch
    import train_gpt as tg
    torch.manual_seed(seed)
    model = randomize_zero_matrices(tg.build_model(smoke_args(*flags)))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.5)
    return model


def tokens_with_docs(n: int, starts, seed: int = 0):
    """n random token ids with EOT (a document start) at the given positions."""
    import torch
    import train_gpt as tg
    x = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))
    x[list(starts)] = tg.EOT_TOKEN
    return x


def assert_traces_as_one_graph_in_bf16(model, x, window_blocks: int = 2):
    """What a GPU run sees: bf16 embeddings (main() casts every nn.Embedding) and torch.compile(fullgraph=True);
    dynamo's trace (eager backend: no inductor on 2 cores) must not break and must give the eager model's loss, and
    the hidden states come out in bf16."""
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.bfloat16()
    window = torch.tensor(window_blocks, dtype=torch.int32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert model.hidden(x, window).dtype == torch.bfloat16
        torch.testing.assert_close(compiled(x, x.roll(-1).long(), window), model(x, x.roll(-1).long(), window))


def preflight_flex_problems(pf, case, tokens, builds: dict) -> dict:
    """tools/preflight.py's flex check of one attention case (pf: the loaded script) on each mask builder of builds
    (name -> build_mask, None = the script's own): name -> the problems it reports."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    results = {}
    for name, build in builds.items():
        cmp = pf.Comparison(torch.float32)
        pf.run_attention_case(case, tokens, 16, 0.12, torch.float32, flex, False, cmp, build_mask=build)
        results[name] = cmp.problems
    torch._dynamo.reset()
    return results


def cpu_fp8_matmul_is_reference_only() -> bool:
    """Whether this CPU's torch._scaled_mm runs oneDNN's reference matmul (no FP8 kernel for the ISA: seen on an
    Intel Xeon with AMX, ~25 MFLOP/s, where a GPT-2 head-sized FP8 product takes ~25 minutes) rather than a
    vectorized one (~1000x faster: the AMD avx512 machines of earlier sessions). Probed once with a 16x768x256
    product: ~0.1 s on the reference path, well under 10 ms on a real kernel."""
    import time
    import torch
    global _FP8_REFERENCE_ONLY
    if "_FP8_REFERENCE_ONLY" not in globals():
        one = torch.tensor(1.0)
        x, w = torch.ones(16, 768).to(torch.float8_e4m3fn), torch.ones(256, 768).to(torch.float8_e4m3fn)
        torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # warm-up
        t = time.perf_counter()
        torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        _FP8_REFERENCE_ONLY = time.perf_counter() - t > 0.02
    return _FP8_REFERENCE_ONLY


def assert_one_error_line(text, *needles, prefix="error:"):
    """text (a tool's stderr) has exactly one line with "error:", no traceback; the line starts with prefix and
    contains every needle. Returns the line."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def attention_pair(*flags, layer: int = 0):
    """Block `layer`'s attention of the smoke model without and with flags, the same weights in both."""
    import torch
    import train_gpt as tg
    torch.manual_seed(0)
    plain = tg.build_attention(smoke_args(), 4096, layer)
    hooked = tg.build_attention(smoke_args(*flags), 4096, layer)
    missing, unexpected = hooked.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    return plain, hooked


def block_mask_as_dense(bm):
    """What a BlockMask lets through: its partial kv blocks under its mask_mod, its full kv blocks entirely."""
    import torch
    import train_gpt as tg
    n = bm.kv_num_blocks.shape[-1]
    out = torch.zeros(n * tg.BLOCK_SIZE, n * tg.BLOCK_SIZE, dtype=torch.bool)
    idx = torch.arange(tg.BLOCK_SIZE)
    for qb in range(n):
        rows = qb * tg.BLOCK_SIZE + idx
        for kb in bm.kv_indices[0, 0, qb, :int(bm.kv_num_blocks[0, 0, qb])].tolist():
            cols = kb * tg.BLOCK_SIZE + idx
            out[rows[:, None], cols[None, :]] = bm.mask_mod(0, 0, rows[:, None], cols[None, :])
        for kb in bm.full_kv_indices[0, 0, qb, :int(bm.full_kv_num_blocks[0, 0, qb])].tolist():
            out[rows[:, None], kb * tg.BLOCK_SIZE + idx[None, :]] = True
    return out
