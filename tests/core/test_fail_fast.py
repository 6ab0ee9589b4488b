"""First contact (issue 12): bad input fails in the first seconds with one clear message and no record; a stopped
run is marked interrupted and can be resumed."""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import summary_of

ROOT = Path(__file__).resolve().parents[2]


def test_a_typo_names_the_nearest_flag():
    with pytest.raises(SystemExit, match="did you mean --num_iterations"):
        tg.apply_overrides(tg.Hyperparameters(), ["--num_iteration=7"])


def test_help_lists_every_flag_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        tg.apply_overrides(tg.Hyperparameters(), ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(tg.Hyperparameters):
        assert f"--{field.name}={getattr(tg.Hyperparameters(), field.name)!r}" in text
    assert "optimizer steps" in text  # num_iterations' comment


@pytest.mark.parametrize("flag,message", [("--kron_rank=0", "--kron_rank=0 must be >= 1"),
                                          ("--ks_rank=-1", "--ks_rank=-1 must be >= 1"),
                                          ("--adam_beta2=1.5", "must be in \\[0, 1\\]"),
                                          ("--muon_lr=-0.1", "must be >= 0")])
def test_numeric_flags_out_of_range_are_refused(flag, message):
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", flag])
    with pytest.raises(SystemExit, match=message):
        tg.check_config(args, 1)


def test_flags_that_other_flags_make_meaningless_warn():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--kron_rank=4", "--kd_alpha=0.3", "--mot_self_window=8",
                                                     "--kron_mlp=off"])
    warnings = "\n".join(tg.meaningless_flags(args))
    assert "--kron_rank=4 has no effect without --kron_mlp" in warnings
    assert "--kd_alpha" in warnings and "--mot_self_window" in warnings
    assert not tg.meaningless_flags(tg.apply_overrides(tg.Hyperparameters(), ["--kron_mlp=both", "--kron_rank=4"]))


def test_a_data_error_stops_before_any_record(tmp_path, shakespeare_shards):
    train, val = shakespeare_shards
    cases = [[f"--train_files={tmp_path}/none_*.bin", f"--val_files={val}"],
             [f"--train_files={train}", f"--val_files={val}", "--num_iterations=100000"],
             [f"--train_files={train}", f"--val_files={val}", f"--init_from={tmp_path}/missing.pt"]]
    for extra in cases:
        with pytest.raises(SystemExit, match="error: "):
            tg.main(["--preset=smoke", f"--records_dir={tmp_path}/records", *extra])
    assert not (tmp_path / "records").exists()


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt.py", "--preset=smoke", "--kron_rank=0", f"--records_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count("--kron_rank=0 must be >= 1") == 1
    assert not any(tmp_path.iterdir())


def test_run_sh_refuses_more_processes_than_gpus():
    import torch
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # this interpreter's python (it has torch) first
    out = subprocess.run(["bash", "run.sh"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PATH=path))
    assert out.returncode == 1 and "GPU(s) visible" in out.stderr


def test_sigterm_marks_the_run_interrupted_with_a_resumable_checkpoint(tmp_path, shakespeare_shards):
    train, val = shakespeare_shards
    flags = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", f"--records_dir={tmp_path}",
             "--num_iterations=40", "--val_every=0", "--save_every=1000", "--micro_batches=1", "--seq_len=256"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train_gpt.py", *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # wait until training is under way, then stop it as torchrun would
        if line.startswith("step:3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=3600)
    assert proc.returncode == 130, err[-2000:]
    summary = summary_of(out)
    assert summary["status"] == "interrupted" and summary["checkpoint"], out[-2000:]
    stopped_at = summary["steps"]
    assert 3 <= stopped_at < 40
    record = Path(summary["record"]).read_text()
    assert f"status: interrupted at step {stopped_at}; resume: --resume=" in record
    resumed = subprocess.run([sys.executable, "train_gpt.py", f"--resume={summary['checkpoint']}",
                              "--num_iterations=42"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=3600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = summary_of(resumed.stdout)
    assert final["status"] == "ok" and final["steps"] == 42 and final["resumed_from"] == summary["checkpoint"]



def test_weights_only_checkpoint_is_small_loads_for_init_from_and_is_refused_by_resume(tmp_path):
    import torch
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--save_checkpoint=weights"])
    assert tg.apply_overrides(tg.Hyperparameters(), ["--save_checkpoint=true"]).save_checkpoint == "full"
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    sum(p.sum() for p in model.parameters()).backward()
    for opt in opts:
        opt.step()
    full = tg.save_checkpoint(tmp_path / "full.pt", model, opts, args, 1, 0.0)
    weights = tg.save_checkpoint(tmp_path / "weights.pt", model, opts, args, 1, 0.0, weights_only=True)
    assert weights.stat().st_size < 0.6 * full.stat().st_size
    loaded = tg.load_checkpoint(str(weights))
    assert "optimizers" not in loaded and tg.checkpoint_args(loaded).save_checkpoint == "weights"
    fresh = tg.build_model(args)
    assert tg.load_weights(fresh, loaded["model"]) is not None
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(SystemExit, match="--init_from="):
        tg.parse_args([f"--resume={weights}"])
