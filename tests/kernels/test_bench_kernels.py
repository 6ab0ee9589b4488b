"""tools/bench_kernels.py on a CPU: small defaults that finish in seconds, one header with units, no roofline."""
import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("tools/bench_kernels.py")


def test_cpu_defaults_are_small_and_labeled(bench, tmp_path, capsys):
    out_path = bench.main(["--device", "cpu", "--out_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "time (ms)" in line)
    for column in ("in->out", "tokens", "impl", "pass", "time (ms)", "x dense", "GB/s", "TFLOP/s", "fwd rel err"):
        assert column in header, column
    assert "peak" not in header and "roofline" not in " ".join(lines)  # a GPU's bandwidth means nothing here
    assert sum("time (ms)" in line for line in lines) == 1  # the header once, not per row
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    # GPT-2's two MLP shapes x dense, torch, kron_matmul (no Triton interpreter, no compile on CPU) x fwd, fwd_bwd
    assert len(rows) == 12 and {r["tokens"] for r in rows} == {256}
    assert {r["impl"] for r in rows} == {"dense", "torch", "kron_matmul"}
    assert all(r["roofline_frac"] is None and r["fwd_rel_err"] < 1e-5 for r in rows)
    assert sum(line.startswith("  768->3072") or line.startswith("  3072->768") for line in lines) == 12


@pytest.mark.slow  # about a minute on a loaded 2-core machine: the bmm reference's bs_first backward is slow on CPU
def test_cpu_ks_defaults_time_whole_chains_only(bench, tmp_path, capsys):
    out_path = bench.main(["--device", "cpu", "--ks", "--out_dir", str(tmp_path)])
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    # 2 shapes x (monarch, butterfly) chains x (dense, bmm bs_first, bmm bs_last) x (fwd, fwd_bwd)
    assert len(rows) == 24 and {r["item"] for r in rows} == {"chain"} and {r["tokens"] for r in rows} == {256}
    header = next(line for line in capsys.readouterr().out.splitlines() if "time (ms)" in line)
    assert "chain:item" in header and "layout" in header and "peak" not in header
