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
