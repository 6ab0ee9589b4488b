"""tools/ks_fit.py: fitting a KS chain (rank_mode blocks) or a butterfly + U V^T (rank_mode adapter) to a dense
matrix, the files it writes, parameter counts, and its errors."""
import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import KSLinear, butterfly_patterns, load_ks_chain, monarch_patterns

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import ks_fit  # noqa: E402

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not importable")

FIT_ARGS = ["--num_samples", "512", "--batch_size", "64", "--lr", "2e-2", "--num_epochs", "30",
            "--scheduler_patience", "2", "--weight_decay", "0", "--save_interval", "10", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: on a shared 2-core machine a second intra-op thread only slows them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_args(*argv):
    return ks_fit.build_parser().parse_args([str(a) for a in argv])


def test_ks_fit_recovers_an_exact_chain_and_writes_everything(tmp_path):
    torch.manual_seed(3)
    patterns = monarch_patterns(24, 16)
    target = KSLinear(patterns).dense_weight().detach()
    state = {"blocks.0.mlp.c_fc.weight": target, "blocks.0.lambdas": torch.ones(2)}
    torch.save({"model": state, "args": {"x": 1}, "step": 5}, tmp_path / "ckpt.pt")
    spec = ";".join(",".join(map(str, p)) for p in patterns)
    out_dir = tmp_path / "out"
    lines = []
    summary = ks_fit.fit(fit_args("--weight_path", tmp_path / "ckpt.pt", "--key", "blocks.0.mlp.c_fc.weight",
                                  "--patterns", spec, "--output_dir", out_dir, "--save_prefix", "fc",
                                  "--log_grad_norm", *FIT_ARGS), log=lines.append)

    assert summary["compression_stats"]["relative_error"] < 1e-3
    names = {p.name for p in out_dir.iterdir()}
    # explicit patterns in blocks mode: no rank shaped the chain, so the curves carry none in their name
    assert names == {"fc_best.pth", "fc_final.pth", "fc_epoch_10.pth", "fc_epoch_20.pth", "fc_epoch_30.pth",
                     "fc_training_log.json", "fc_loss_curves.json", "fc_loss_curves.csv"}
    for name in {n for n in names if n.endswith(".pth")}:
        ckpt = torch.load(out_dir / name, weights_only=True)
        for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "train_loss", "val_loss",
                    "grad_norm", "lr", "patterns", "impl", "bs_last", "rank_mode", "adapter_rank",
                    "compression_stats", "epoch"):
            assert key in ckpt, (name, key)
        assert "compression" not in ckpt  # the old name is read, never written
        assert ckpt["grad_norm"] > 0 and ckpt["impl"] == "bmm" and ckpt["bs_last"] is False
        assert ckpt["rank_mode"] == "blocks" and ckpt["adapter_rank"] == 0
        assert [tuple(p) for p in ckpt["patterns"]] == list(patterns)
        stats = ckpt["compression_stats"]
        assert set(stats) >= {"dense_params", "ks_params", "adapter_params", "fitted_params", "compression_ratio",
                              "memory_saved_bytes", "relative_error"}
        assert stats["dense_params"] == 384 and stats["ks_params"] == stats["fitted_params"] == 160
    log = json.loads((out_dir / "fc_training_log.json").read_text())
    assert len(log["epochs"]) == 30 and set(log["epochs"][0]) >= {"epoch", "train_loss", "val_loss", "lr", "grad_norm"}
    assert log["best_relative_error"] < 1e-3
    assert log["compression_stats"]["compression_ratio"] == pytest.approx(2.4)
    report = "\n".join(lines)
    assert "dense params 384" in report and "KS params 160" in report and "compression 2.40x" in report
    assert "relative error" in report and "memory saved" in report

    # the documented three lines
    chain = load_ks_chain(out_dir / "fc_best.pth")
    x = torch.randn(5, 16)
    torch.testing.assert_close(chain(x), x @ target.T, rtol=1e-3, atol=1e-3)


def test_loss_curves_json_and_csv_hold_every_epoch(tmp_path):
    torch.save(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "w.pt")
    summary = ks_fit.main(["--weight_path", str(tmp_path / "w.pt"), "--rank", "1", "--num_epochs", "3",
                           "--num_samples", "128", "--batch_size", "64", "--output_dir", str(tmp_path / "o"),
                           "--save_prefix", "fc", "--device", "cpu"])
    stem = tmp_path / "o" / "fc_rank_1_loss_curves"
    assert summary["loss_curves"] == [f"{stem}.json", f"{stem}.csv"]
    curves = json.loads(Path(f"{stem}.json").read_text())
    assert curves["rank"] == 1 and curves["rank_mode"] == "blocks" and curves["weight_shape"] == [24, 16]
    assert curves["epoch"] == [1, 2, 3]
    assert curves["val_loss"] == [e["val_loss"] for e in summary["epochs"]]
    assert curves["train_loss"] == [e["train_loss"] for e in summary["epochs"]]
    with open(f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(curves["val_loss"], rel=1e-12)
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "lr", "grad_norm", "time_s"}


def test_save_interval_zero_writes_no_periodic_checkpoints(tmp_path):
    torch.save(torch.randn(24, 16), tmp_path / "w.pt")
    lines = []
    ks_fit.fit(fit_args("--weight_path", tmp_path / "w.pt", "--rank", "1", "--num_epochs", "4", "--save_interval",
                        "0", "--num_samples", "128", "--batch_size", "64", "--output_dir", tmp_path / "o",
                        "--device", "cpu"), log=lines.append)
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert not any("_epoch_" in n for n in names), names
    assert {"ks_chain_best.pth", "ks_chain_final.pth"} <= names
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["4"]  # only the last epoch


def test_adapter_fits_butterfly_plus_low_rank(tmp_path):
    """W = rank-1 butterfly + a rank-2 term: the adapter mode starts at W's truncated SVD (the best the rank-2 term
    does alone), the fit takes it 10x below that, and the butterfly alone cannot hold the rank-2 term. (Deep
    butterflies fit slowly: at 40 epochs other seeds land between 1e-4 and 2.5e-2.)"""
    torch.manual_seed(0)
    patterns = butterfly_patterns(32, 16, 1)
    low_rank = torch.randn(32, 2) @ torch.randn(2, 16) * 0.3
    target = KSLinear(patterns).dense_weight().detach() + low_rank
    torch.save(target, tmp_path / "w.pt")
    common = ["--weight_path", tmp_path / "w.pt", "--num_samples", "512", "--batch_size", "64", "--lr", "2e-2",
              "--num_epochs", "40", "--scheduler_patience", "2", "--weight_decay", "0", "--save_interval", "0",
              "--device", "cpu"]
    lines = []
    adapter = ks_fit.fit(fit_args(*common, "--rank_mode", "adapter", "--rank", "2", "--output_dir", tmp_path / "a"),
                         log=lines.append)
    alone = ks_fit.fit(fit_args(*common, "--rank", "1", "--output_dir", tmp_path / "b"), log=lambda _: None)

    s = torch.linalg.svdvals(target.double())
    svd_error = (s[2:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    start = float(re.search(r"start .*relative error (\S+)", "\n".join(lines)).group(1))
    assert start == pytest.approx(svd_error, rel=1e-3)
    stats = adapter["compression_stats"]
    assert stats["relative_error"] < svd_error / 10
    assert alone["compression_stats"]["relative_error"] > 0.1
    assert stats["ks_params"] == kernels.ks_param_count(patterns) and stats["adapter_params"] == 2 * (32 + 16)
    assert adapter["rank_mode"] == "adapter" and adapter["adapter_rank"] == 2
    assert (tmp_path / "a" / "ks_chain_rank_2_loss_curves.csv").exists()

    model = ks_fit.load_fitted(tmp_path / "a" / "ks_chain_best.pth")
    assert isinstance(model, ks_fit.ButterflyLowRank) and model.rank == 2
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ model.dense_weight().T, rtol=1e-5, atol=1e-5)
        rel = ((model.dense_weight() - target).norm() / target.norm()).item()
    assert rel == pytest.approx(adapter["best_relative_error"], rel=1e-4)  # the loaded fit is the saved one
    assert isinstance(ks_fit.load_fitted(tmp_path / "b" / "ks_chain_best.pth"), KSLinear)


def test_param_counts_of_both_rank_modes():
    """The numbers the README quotes. A 2^k x 2^(k-1) butterfly has k-1 factors of 2x2 blocks (the first 4x2), each
    with out * 2 = 2048 parameters at 1024x512; rank r widens alternate interfaces (blocks) or adds r (out + in)."""
    c = ks_fit.param_counts((1024, 512), 4)
    assert c["dense"] == 524288
    assert c["adapter"]["chain"] == 9 * 2048 and c["adapter"]["adapter"] == 4 * 1536
    assert c["adapter"]["total"] == 24576 and c["blocks"]["total"] == 67584
    assert c["blocks"]["total"] == kernels.ks_param_count(butterfly_patterns(1024, 512, 4))
    c = ks_fit.param_counts((3072, 768), 4)
    assert c["dense"] == 2359296 and c["blocks"]["total"] == 163840
    assert c["adapter"]["total"] == kernels.ks_param_count(butterfly_patterns(3072, 768, 1)) + 4 * 3840 == 56320
    too_big = ks_fit.param_counts((16, 16), 4)
    assert "use rank <= 1" in too_big["blocks"]["error"] and "use --rank <= 3" in too_big["adapter"]["error"]


def test_count_only_prints_both_modes_without_a_weight(capsys):
    counts = ks_fit.main(["--count_only", "--shape", "1024", "512", "--rank", "4"])
    out = capsys.readouterr().out
    assert counts == ks_fit.param_counts((1024, 512), 4)
    assert "1024x512: dense 524,288" in out and "blocks   butterfly chain 67,584" in out
    assert "adapter  rank-1 butterfly 18,432 + U V^T 6,144 = 24,576" in out


def test_old_checkpoints_read_through_stats_of(tmp_path):
    torch.save(torch.randn(24, 16), tmp_path / "w.pt")
    ks_fit.fit(fit_args("--weight_path", tmp_path / "w.pt", "--rank", "1", "--num_epochs", "1", "--num_samples",
                        "128", "--output_dir", tmp_path / "o", "--device", "cpu"), log=lambda _: None)
    ckpt = torch.load(tmp_path / "o" / "ks_chain_final.pth", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k not in ("compression_stats", "rank_mode", "adapter_rank")}
    old["compression"] = ckpt["compression_stats"]  # what ks_fit wrote before the rename
    torch.save(old, tmp_path / "old.pth")
    assert ks_fit.stats_of(old) == ckpt["compression_stats"] == ks_fit.stats_of(ckpt)
    model = ks_fit.load_fitted(tmp_path / "old.pth")
    assert isinstance(model, KSLinear)
    torch.testing.assert_close(model.dense_weight(), load_ks_chain(tmp_path / "o" / "ks_chain_final.pth")
                               .dense_weight())
    with pytest.raises(ValueError, match="no compression_stats"):
        ks_fit.stats_of({"epoch": 1})


@needs_triton
def test_ks_fit_runs_the_triton_impl_batch_size_last(tmp_path):
    torch.save(torch.randn(24, 16), tmp_path / "w.pt")
    summary = ks_fit.main(["--weight_path", str(tmp_path / "w.pt"), "--patterns", "1,4,4,4;4,6,4,1", "--impl",
                           "triton", "--bs_last", "--num_samples", "80", "--num_epochs", "2", "--batch_size", "64",
                           "--scheduler", "cosine", "--optimizer", "sgd", "--output_dir", str(tmp_path / "o"),
                           "--device", "cpu"])
    assert summary["impl"] == "triton" and summary["bs_last"] and len(summary["epochs"]) == 2
    assert load_ks_chain(tmp_path / "o" / "ks_chain_final.pth", impl="bmm").bs_last


def test_ks_fit_bad_inputs_name_the_valid_options(tmp_path, capsys):
    torch.save({"model": {"h.0.mlp.c_fc.weight": torch.randn(24, 16), "h.0.lambdas": torch.ones(2)}},
               tmp_path / "ckpt.pt")
    torch.save(torch.randn(2, 3, 4), tmp_path / "t3.pt")
    torch.save(torch.randn(13, 16), tmp_path / "prime.pt")
    torch.save(torch.randn(16, 16), tmp_path / "w16.pt")
    cases = [
        (["--weight_path", "ckpt.pt", "--key", "h.0.mlp.c_fc"], "available keys: h.0.mlp.c_fc.weight \\(24, 16\\)"),
        (["--weight_path", "ckpt.pt"], "pass --key, one of: h.0.mlp.c_fc.weight"),
        (["--weight_path", "ckpt.pt", "--key", "h.0.lambdas"], "2-D.*got shape \\(2,\\); 2-D keys: h.0.mlp.c_fc"),
        (["--weight_path", "t3.pt"], "2-D \\(out_features, in_features\\) matrix, got shape \\(2, 3, 4\\)"),
        (["--weight_path", "prime.pt"], "no butterfly chain for \\(13, 16\\).*\\(1, 13, 16, 1\\)"),
        (["--weight_path", "w16.pt"], "rank-4 chain for \\(16, 16\\) has 512 parameters.*use rank <= 1"),
        (["--weight_path", "w16.pt", "--patterns", "1,4,4,4;4,6,4,1"], "map 16 -> 24 features"),
        (["--weight_path", "w16.pt", "--patterns", "1,4,4"], "four positive ints"),
        (["--weight_path", "w16.pt", "--num_epochs", "0"], "--num_epochs must be >= 1.*--count_only"),
        (["--weight_path", "w16.pt", "--save_interval", "-1"], "--save_interval must be >= 0 \\(0 = no periodic"),
        (["--weight_path", "w16.pt", "--rank", "0"], "--rank must be >= 1"),
        (["--weight_path", "w16.pt", "--rank_mode", "adapter", "--rank", "4"],
         "adapter --rank 4 for \\(16, 16\\) has 128 chain \\+ 128 adapter.*use --rank <= 3"),
        (["--weight_path", "w16.pt", "--patterns", "1,4,4,4;4,4,4,1", "--rank", "2"],
         "--rank has no effect with --patterns in --rank_mode blocks.*--rank_mode adapter"),
        (["--rank", "2"], "--weight_path is required.*--count_only --shape OUT IN"),
        (["--count_only"], "--count_only needs the matrix shape: --shape OUT IN"),
        (["--weight_path", "w16.pt", "--shape", "16", "16"], "--shape is for --count_only"),
    ]
    for argv, message in cases:
        if "--weight_path" in argv:
            argv[1] = str(tmp_path / argv[1])
        with pytest.raises(SystemExit):
            ks_fit.main([*argv, "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
    assert not (tmp_path / "o").exists()
