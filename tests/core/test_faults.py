"""Nothing lost, nothing raw (issue 22): a full disk or a killed checkpoint write never costs a run its result, a
resume that cannot continue leaves no record, and every bad input is one `error:` line before any model or record
exists. The faults that need a process of their own (resource limits, signals) run in a subprocess on a tiny model;
the bad inputs run in-process: main() raising SystemExit with a one-line `error:` string is exactly what Python
prints without a traceback."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import summary_of, write_shard

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset=smoke", "--model_dim=32", "--num_heads=1", "--seq_len=256", "--micro_batches=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random GPT-2 tokens with a document (EOT) every ~300 tokens: (train glob, val glob)."""
    out = tmp_path_factory.mktemp("fault_shards")
    rng = np.random.default_rng(0)
    for name, n in (("train_000001", 120_000), ("val_000000", 16_384)):
        tokens = rng.integers(0, 50_000, n)
        tokens[rng.random(n) < 1 / 300] = tg.EOT_TOKEN
        write_shard(out / f"f_{name}.bin", tokens)
    return str(out / "f_train_*.bin"), str(out / "f_val_*.bin")


def data_flags(shards, records: Path) -> list[str]:
    return [f"--train_files={shards[0]}", f"--val_files={shards[1]}", f"--records_dir={records}"]


def run_script(flags: list[str], fsize_limit: int | None = None, timeout: int = 900):
    def limit():
        if fsize_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    return subprocess.run([sys.executable, "train_gpt.py", *flags], cwd=ROOT, env=ENV, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=limit)


def assert_error_exit(error: SystemExit, *fragments: str):
    message = error.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint writes


def test_a_full_disk_during_periodic_checkpoints_keeps_the_run_and_its_result(shards, tmp_path):
    """RLIMIT_FSIZE below a checkpoint's size (the record is smaller): every checkpoint write fails with EFBIG;
    each failure is one logged line, training goes on, the summary has the result, no temporary is left."""
    out = run_script([*TINY, *data_flags(shards, tmp_path), "--num_iterations=4", "--save_every=2",
                      "--save_checkpoint=full"], fsize_limit=8 * 2**20)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = summary_of(out.stdout)
    assert summary["status"] == "ok" and summary["final_val_loss"] is not None and summary["steps"] == 4
    assert summary["checkpoint"] is None and summary["checkpoint_failures"] == 2  # step 2 and the final one
    failures = [line for line in out.stdout.splitlines() if line.startswith("checkpoint failed:")]
    assert len(failures) == 2 and "ulimit -f" in failures[0] and failures[0].endswith("training continues")
    assert failures[1].endswith("the record keeps the result")
    assert "Traceback" not in out.stderr
    assert [p.suffix for p in files_under(tmp_path)] == [".txt"]


def test_periodic_checkpoints_are_pruned_to_keep_checkpoints(shards, tmp_path):
    out = run_script([*TINY, *data_flags(shards, tmp_path), "--num_iterations=5", "--save_every=1",
                      "--keep_checkpoints=2", "--save_checkpoint=full"])
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(p.name.split("_", 1)[1] for p in files_under(tmp_path) if p.suffix == ".pt")
    assert names == ["final.pt", "step3.pt", "step4.pt"]
    assert "removed" in out.stdout and "--keep_checkpoints=2" in out.stdout


KILLED_WRITE = """
import os, signal, sys, torch
sys.argv[0] = "train_gpt.py"
sys.path.insert(0, ".")
import train_gpt
saves = 0
real_save = torch.save
def save_then_die(obj, f, *a, **k):  # the second checkpoint: half its bytes on disk, then SIGKILL
    global saves
    saves += 1
    if saves < 2:
        return real_save(obj, f, *a, **k)
    with open(f, "wb") as out:
        out.write(b"\\0" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.exit(train_gpt.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_the_next_start_cleans_up(shards, tmp_path):
    flags = [*TINY, *data_flags(shards, tmp_path), "--num_iterations=6", "--save_every=2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, *flags], cwd=ROOT, env=ENV, text=True,
                            capture_output=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    temporaries = [p for p in files_under(tmp_path) if p.name.endswith(".tmp")]
    assert len(temporaries) == 1
    previous = next(p for p in files_under(tmp_path) if p.name.endswith("_step2.pt"))
    assert tg.load_checkpoint(str(previous))["step"] == 2  # the rename is atomic: no half file under its name

    resumed = run_script([f"--resume={previous}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed a stale checkpoint temporary of a stopped run: {temporaries[0]}" in resumed.stdout
    assert not any(p.name.endswith(".tmp") for p in files_under(tmp_path))
    assert summary_of(resumed.stdout)["steps"] == 6


def test_a_live_writers_temporary_is_not_stale(tmp_path):
    import socket
    mine = tmp_path / f"a_step2.pt.{socket.gethostname()}.{os.getpid()}.tmp"
    dead = tmp_path / f"a_step4.pt.{socket.gethostname()}.{2**22 + 12345}.tmp"  # above the kernel's pid_max
    other_host = tmp_path / f"a_step6.pt.another-host.1.tmp"
    old_unnamed, new_unnamed = tmp_path / "b_step2.pt.tmp", tmp_path / "b_step4.pt.tmp"
    for p in (mine, dead, other_host, old_unnamed, new_unnamed):
        p.write_bytes(b"x")
    os.utime(old_unnamed, (0, 0))
    assert sorted(tg.stale_temporaries(tmp_path)) == sorted([dead, old_unnamed])


def test_double_sigint_ends_the_run_interrupted_without_a_traceback_or_temporary(shards, tmp_path):
    flags = [*TINY, *data_flags(shards, tmp_path), "--num_iterations=200", "--val_every=0", "--save_every=1000"]
    proc = subprocess.Popen([sys.executable, "train_gpt.py", *flags], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("step:3/"):
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    record = next(p for p in files_under(tmp_path) if p.suffix == ".txt").read_text()
    assert "status: interrupted" in record
    assert not any(p.name.endswith(".tmp") for p in files_under(tmp_path))


def test_a_record_that_cannot_be_written_is_one_line_and_leaves_no_half_record(shards, tmp_path):
    out = run_script([*TINY, *data_flags(shards, tmp_path), "--num_iterations=2"], fsize_limit=100_000)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write the record" in errors[0] and "ulimit -f" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Resume and init-from


@pytest.fixture(scope="module")
def finished_checkpoint(shards, tmp_path_factory):
    """A 3-step tiny run's full final checkpoint, written as main() does (no training needed to test refusals)."""
    folder = tmp_path_factory.mktemp("finished")
    args = tg.apply_overrides(tg.Hyperparameters(), [*TINY, *data_flags(shards, folder), "--num_iterations=3",
                                                     "--save_checkpoint=full"])
    model = tg.build_model(args)
    return tg.save_checkpoint(folder / "run_final.pt", model, tg.build_optimizers(model, args), args, 3, 1.0)


def test_resuming_a_finished_checkpoint_is_refused_with_the_reason(finished_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main([f"--resume={finished_checkpoint}", f"--records_dir={tmp_path}"])
    assert_error_exit(e.value, "is at step 3 and the run has 3 steps", "--num_iterations")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("flag,fragment", [("--resume", "another model than the checkpoint's"),
                                           ("--init_from", "does not fit this model")])
def test_a_checkpoint_of_another_shape_is_refused_before_any_record(finished_checkpoint, tmp_path, shards, flag,
                                                                     fragment):
    extra = ["--num_iterations=10"] if flag == "--resume" else [*TINY, *data_flags(shards, tmp_path)]
    with pytest.raises(SystemExit) as e:
        tg.main([*extra, f"{flag}={finished_checkpoint}", "--model_dim=64", f"--records_dir={tmp_path}"])
    assert_error_exit(e.value, fragment, "embed.weight: checkpoint (50257, 32) vs model (50257, 64)")
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, before any model or record


def bad_shard(folder: Path, kind: str) -> str:
    path = folder / f"bad_{kind}.bin"
    good = np.zeros(256, dtype="<i4")
    good[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, 50_000)
    body = np.ones(50_000, dtype="<u2").tobytes()
    data = dict(truncated=good.tobytes() + body[:1000], tiny=b"\0" * 200,
                magic=np.array([1, 1, 50_000] + [0] * 253, dtype="<i4").tobytes() + body)[kind]
    path.write_bytes(data)
    return str(path)


BAD_FLAGS = [
    (["--muon_lr=nan"], "--muon_lr=nan must be a finite number"),
    (["--embed_lr=inf"], "--embed_lr=inf must be a finite number"),
    (["--num_heads=0"], "--num_heads=0 must be >= 1"),
    (["--stages=256:257:1-3:nan"], "--stages"),
    (["--model_dim=1000000000", "--num_heads=1"], "overflow"),
    (["--model_dim=100000", "--num_heads=1000"], "its weights and gradients alone need"),
]


@pytest.mark.parametrize("flags,fragment", BAD_FLAGS, ids=[f[0][0].split("=")[0] + f[0][0][-3:] for f in BAD_FLAGS])
def test_bad_flags_are_one_line_before_anything_is_built(flags, fragment, shards, tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, *data_flags(shards, tmp_path), *flags])
    assert_error_exit(e.value, fragment)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("kind,fragment", [("truncated", "truncated or corrupted"), ("tiny", "shorter than the"),
                                           ("magic", "wrong magic number")])
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_shards_are_one_line(kind, fragment, split, shards, tmp_path):
    flags = data_flags(shards, tmp_path / "records")
    flags[split == "val"] = f"--{split}_files={bad_shard(tmp_path, kind)}"
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, *flags])
    assert_error_exit(e.value, fragment, "bad_")
    assert not (tmp_path / "records").exists()


def test_a_records_dir_that_is_a_file_is_one_line(shards, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, *data_flags(shards, tmp_path / "file" / "records")])
    assert_error_exit(e.value, "is a file, not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_records_dir_that_is_not_writable_is_one_line(shards, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, *data_flags(shards, tmp_path / "ro" / "records")])
    assert_error_exit(e.value, "is not writable")


def test_bos_align_counts_the_documents_it_needs_up_front(tmp_path):
    """--preset=frontier_smoke on a one-document corpus (Tiny Shakespeare has no EOT at all) used to run out of
    documents at the first batch with a RuntimeError traceback."""
    write_shard(tmp_path / "one_train_000001.bin", np.ones(400_000, dtype=np.int64))
    write_shard(tmp_path / "one_val_000000.bin", np.ones(70_000, dtype=np.int64))
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset=frontier_smoke", f"--train_files={tmp_path}/one_train_*.bin",
                 f"--val_files={tmp_path}/one_val_*.bin", f"--records_dir={tmp_path}/records"])
    assert_error_exit(e.value, "holds 0 documents", "--bos_align=false")
    assert not (tmp_path / "records").exists()


def test_records_go_beside_the_script_wherever_the_run_starts(tmp_path):
    args = tg.apply_overrides(tg.Hyperparameters(), [])
    assert tg.records_root(args) == ROOT / "records"
    assert tg.record_folder(args, torch.device("cpu")) == ROOT / "records" / "local" / args.track
    absolute = tg.apply_overrides(tg.Hyperparameters(), [f"--records_dir={tmp_path}"])
    assert tg.records_root(absolute) == tmp_path


def test_run_sh_without_torch_says_so(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert out.returncode == 1 and "cannot import torch" in out.stderr and "GPU(s)" not in out.stderr


def test_optimizer_states_that_do_not_fit_are_refused_before_any_record(shards, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    args = tg.apply_overrides(tg.Hyperparameters(), [*TINY, *data_flags(shards, folder), "--num_iterations=3",
                                                     "--kron_mlp=both", "--kron_optimizer=adam"])
    model = tg.build_model(args)
    path = tg.save_checkpoint(folder / "run_step1.pt", model, tg.build_optimizers(model, args), args, 1, 1.0)
    with pytest.raises(SystemExit) as e:
        tg.main([f"--resume={path}", "--kron_optimizer=muon", f"--records_dir={tmp_path / 'records'}"])
    assert_error_exit(e.value, "its optimizer states do not fit")
    assert not (tmp_path / "records").exists()


def test_a_broken_kernel_config_table_is_one_line_and_a_used_one_is_recorded(shards, tmp_path, monkeypatch):
    import kernels
    (tmp_path / "bad.json").write_text("{bad")
    monkeypatch.setenv("KERNEL_CONFIGS", str(tmp_path / "bad.json"))
    kernels.reset_config_table()
    try:
        with pytest.raises(SystemExit) as e:
            tg.main([*TINY, *data_flags(shards, tmp_path / "records")])
    finally:
        monkeypatch.setenv("KERNEL_CONFIGS", "none")
        kernels.reset_config_table()
    assert_error_exit(e.value, "kernel config table", "KERNEL_CONFIGS=none")
    assert not (tmp_path / "records").exists()

    table = tmp_path / "kernel_configs.json"
    table.write_text('{"format": "a tuned table"}\n')
    monkeypatch.setattr(tg.kernels, "config_table_path", lambda: table)
    record = tg.RunRecord(tg.apply_overrides(tg.Hyperparameters(), [f"--records_dir={tmp_path}"]),
                          tg.DistEnv(0, 1, 0, torch.device("cpu")))
    assert f"{'=' * 20} kernel configs: {table} {'=' * 20}\n{table.read_text()}" in record.path.read_text()
