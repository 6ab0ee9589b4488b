import os
import sys
from pathlib import Path

# Triton kernels run under the interpreter on CPU machines; the variable must be set before triton is imported.
# Set KERNEL_TESTS_ON_GPU=1 to run the kernel tests on a real GPU instead.
if os.environ.get("KERNEL_TESTS_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_shared_cache = ROOT.parent / "shared" / "tiktoken_cache"
if _shared_cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared_cache))

import importlib.util  # noqa: E402

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
