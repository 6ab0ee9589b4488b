"""End-to-end runs on CPU: the smoke preset learns and writes a complete record; NaN marks the record failed;
1 process x 2-way accumulation equals 2 processes (gloo) x 1-way."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import summary_of, val_losses

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, steps, cwd=ROOT):
    """Run a training command of `steps` steps. Its budget is the step count, not wall time: the timeout (10 minutes
    plus 2 per step, against a few seconds per smoke step) only catches a hang, never a slow or loaded machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if "torch.distributed.run" in cmd else os.environ.get(
        "OMP_NUM_THREADS", "2"))
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600 + 120 * steps, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_smoke_run_learns_and_writes_a_complete_record(shakespeare_shards, tmp_path):
    train, val = shakespeare_shards
    stdout = run([sys.executable, "train_gpt.py", "--preset=smoke", f"--train_files={train}", f"--val_files={val}",
                  f"--records_dir={tmp_path}"], steps=30)
    summary = summary_of(stdout)
    assert summary["status"] == "ok" and summary["steps"] == 30 and summary["world_size"] == 1
    assert summary["final_val_loss"] < 7.0 and summary["tokens"] == 30 * 1024
    record = Path(summary["record"])
    assert record.parent.parent == tmp_path / "local" and record.parent.name.endswith("_smoke")
    text = record.read_text()
    for section in ("train_gpt.py", "kernels.py", "environment", "hyperparameters", "log"):
        assert f"==================== {section} ====================" in text
    assert (ROOT / "train_gpt.py").read_text() in text
    log = text.split("==================== log ====================\n")[1]
    vals = val_losses(log)
    assert len(vals) == 4 and abs(vals[0] - 10.83) < 0.05 and vals[-1] == pytest.approx(summary["final_val_loss"],
                                                                                        abs=1e-4)
    lines = log.splitlines()
    assert sum(l.startswith("step:") and "train_time:" in l and "val_loss" not in l for l in lines) == 30
    assert any(l.startswith("peak memory") for l in lines) and lines[-1].startswith("summary: ")


def test_nonfinite_loss_marks_the_record_failed(shakespeare_shards, tmp_path, capsys, monkeypatch):
    train, val = shakespeare_shards
    real_step = tg.train_step

    def diverging_step(*args):  # from step 2 on the loss is nan (non-finite LR flags are refused up front)
        loss = real_step(*args)
        return loss * float("nan") if args[5] >= 2 else loss
    monkeypatch.setattr(tg, "train_step", diverging_step)
    code = tg.main(["--preset=smoke", f"--train_files={train}", f"--val_files={val}", f"--records_dir={tmp_path}",
                    "--num_iterations=6", "--val_every=0"])
    assert code == 1
    summary = summary_of(capsys.readouterr().out)
    assert summary["status"] == "failed" and "non-finite" in summary["reason"] and summary["steps"] < 6
    text = Path(summary["record"]).read_text()
    assert "status: failed reason: non-finite" in text and text.rstrip().splitlines()[-1].startswith("summary: ")


def test_records_are_never_overwritten(tmp_path, monkeypatch):
    args = tg.Hyperparameters(records_dir=str(tmp_path))
    env = tg.DistEnv(0, 1, 0, torch.device("cpu"))
    fixed = uuid.UUID(int=1)
    monkeypatch.setattr(tg.uuid, "uuid4", lambda: fixed)
    first = tg.RunRecord(args, env)
    first.log("step:1/1 train_time:1ms step_avg:1.00ms", console=False)
    with pytest.raises(FileExistsError):
        tg.RunRecord(args, env)
    assert "step:1/1" in first.path.read_text()


def test_two_processes_equal_one_process_with_accumulation(shakespeare_shards, tmp_path):
    train, val = shakespeare_shards
    common = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", "--num_iterations=3",
              "--val_every=0", "--val_tokens=2048", "--save_checkpoint=true"]
    one = summary_of(run([sys.executable, "train_gpt.py", *common, f"--records_dir={tmp_path / 'one'}"], steps=3))
    two = summary_of(run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt.py", *common, f"--records_dir={tmp_path / 'two'}"], steps=3))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    w1 = torch.load(one["checkpoint"])["model"]
    w2 = torch.load(two["checkpoint"])["model"]
    assert w1.keys() == w2.keys()
    for name in w1:
        if "embed" in name:
            # Adam at lr 0.6 turns float-order noise in near-zero gradient entries into +-lr updates: a handful of
            # embedding entries (~1e-5 of them) may flip; all others must agree.
            close = torch.isclose(w1[name], w2[name], rtol=1e-3, atol=1e-4)
            assert close.float().mean() > 0.9999, name
        else:
            torch.testing.assert_close(w1[name], w2[name], rtol=1e-3, atol=1e-4, msg=name)
    init = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), common[:1]))
    moved = sum(not torch.equal(init.state_dict()[n], w1[n]) for n in w1)
    assert moved > len(w1) // 2  # the runs trained; equality is not two untouched initializations
    assert one["final_val_loss"] == pytest.approx(two["final_val_loss"], abs=1e-4)


def test_cpu_runs_go_to_the_ignored_local_tree():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--records_dir=r", "--track=track_1_short"])
    assert tg.record_folder(args, torch.device("cpu")) == ROOT / "r/local/track_1_short"
    assert tg.record_folder(args, torch.device("cuda", 0)) == ROOT / "r/track_1_short"
    args.track = "local"
    assert tg.record_folder(args, torch.device("cpu")) == ROOT / "r/local"
    assert "records/local/" in (ROOT / ".gitignore").read_text().split()


def test_four_processes_on_two_nodes_equal_one_process(shakespeare_shards, tmp_path):
    """run.sh's several-node launch (torchrun, c10d rendezvous at MASTER_ADDR:MASTER_PORT) with two "nodes" of two
    gloo processes each on localhost: the same final loss as one process with 4-way accumulation."""
    import socket
    train, val = shakespeare_shards
    common = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", "--num_iterations=2",
              "--val_every=0", "--micro_batches=4"]
    one = summary_of(run([sys.executable, "train_gpt.py", *common, f"--records_dir={tmp_path / 'one'}"], steps=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_id = f"test{uuid.uuid4().hex[:8]}"  # one id for both nodes: that is what makes them one job
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=2",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
         "train_gpt.py", *common, f"--records_dir={tmp_path / 'four'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    try:  # a rendezvous that never completes fails the test in minutes instead of hanging the suite
        outs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), outs[0][1][-3000:] + outs[1][1][-3000:]
    four = summary_of(next(out for out, _ in outs if "summary: " in out))
    assert four["world_size"] == 4
    assert four["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-4)
