"""tools/mlp_init.py (a Kronecker / KS student from a dense checkpoint) and tools/eval.py (a checkpoint's val loss),
on the smoke model with random weights and random-token shards."""
import json

import pytest
import torch

import train_gpt as tg
from conftest import load_script, val_losses, write_shard
from kernels import KronLinear, kron_dense_weight

mlp_init = load_script("tools/mlp_init.py")
evaluate = load_script("tools/eval.py")

KRON = "--kron_mlp=both --kron_rank=2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These ops are tiny: on a shared 2-core machine a second intra-op thread made them 10-70x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(train glob, val glob): random tokens with a document separator every ~300 tokens."""
    root = tmp_path_factory.mktemp("shards")
    gen = torch.Generator().manual_seed(0)
    for name, n in (("train_000001", 8192), ("val_000000", 4097)):
        tokens = torch.randint(0, 50257, (n,), generator=gen)
        tokens[torch.rand(n, generator=gen) < 1 / 300] = tg.EOT_TOKEN
        write_shard(root / f"{name}.bin", tokens.tolist())
    return str(root / "train_*.bin"), str(root / "val_*.bin")


def teacher_args(shards):
    train, val = shards
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", f"--train_files={train}",
                                                     f"--val_files={val}", "--val_tokens=2048"])


def save_teacher(path, args, kron_structured=False):
    """The smoke model with every matrix random (c_proj and the head start at zero otherwise). With
    kron_structured, each MLP matrix is an exact rank-2 Kronecker sum in the factors a KRON student picks."""
    torch.manual_seed(1)
    model = tg.build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                bound = 3 ** 0.5 * 0.5 * p.shape[-1] ** -0.5
                p.uniform_(-bound, bound)
        if kron_structured:
            student = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", *KRON.split()]))
            for block, s_block in zip(model.blocks, student.blocks):
                for which in ("c_fc", "c_proj"):
                    m1, k1, m2, k2 = getattr(s_block.mlp, which).factors
                    W = kron_dense_weight(torch.randn(2, m1, k1), torch.randn(2, m2, k2))
                    getattr(block.mlp, which).weight.copy_(W / W.std() * 0.05)
    tg.save_checkpoint(path, model, tg.build_optimizers(model, args), args, 7, 0.0)
    return path


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "dense.pt", teacher_args(shards))


def run_init(teacher_path, out, flags, *extra):
    return mlp_init.main(["--checkpoint", str(teacher_path), "--out", str(out), "--student_flags", flags, *extra])


def test_vanloan_recovers_exact_kronecker_weights(shards, tmp_path):
    path = save_teacher(tmp_path / "kron_dense.pt", teacher_args(shards), kron_structured=True)
    result = run_init(path, tmp_path / "student.pt", KRON, "--method=vanloan")
    assert len(result["matrices"]) == 8 and all(m["rel_err"] < 1e-5 for m in result["matrices"]), result
    dense, student = tg.load_checkpoint(str(path))["model"], tg.load_checkpoint(str(tmp_path / "student.pt"))["model"]
    for i in range(4):
        for which in ("c_fc", "c_proj"):
            W = dense[f"blocks.{i}.mlp.{which}.weight"]
            W_s = kron_dense_weight(student[f"blocks.{i}.mlp.{which}.A"], student[f"blocks.{i}.mlp.{which}.B"])
            assert ((W_s - W).norm() / W.norm()).item() < 1e-5


def test_student_checkpoint_loads_with_every_key_and_copies_the_teacher(shards, teacher, tmp_path):
    out = tmp_path / "student.pt"
    result = run_init(teacher, out, "--kron_mlp=fc --kron_rank=2", "--method=vanloan")
    ckpt = tg.load_checkpoint(str(out))
    assert ckpt["step"] == 0 and tg.checkpoint_args(ckpt).kron_mlp == "fc" and not tg.checkpoint_args(ckpt).init_from
    student = tg.build_model(tg.apply_overrides(teacher_args(shards), ["--kron_mlp=fc", "--kron_rank=2"]))
    report = tg.load_weights(student, ckpt["model"])
    assert "missing (fresh init): none" in report and "unexpected (ignored): none" in report, report
    own = student.state_dict()
    dense = tg.load_checkpoint(str(teacher))["model"]
    shared = [k for k, v in dense.items() if k in own and own[k].shape == v.shape]
    assert "blocks.0.mlp.c_proj.weight" in shared and "lm_head.weight" in shared and "embed.weight" in shared
    assert len(shared) == len(own) - 4 * 2  # all but the A, B of the four c_fc
    assert sorted(shared) == sorted(result["copied"])
    for k in shared:
        assert torch.equal(ckpt["model"][k], dense[k]), k
    assert "--kron_mlp=fc" in result["flags"] and result["command"].endswith(f"--init_from={out}")


@pytest.mark.parametrize("flags", [KRON, "--ks_mlp=both"])
def test_distill_reduces_every_blocks_mse(teacher, tmp_path, flags):
    result = run_init(teacher, tmp_path / "student.pt", flags, "--tokens=2048", "--seq_len=512", "--steps=40",
                      "--batch_size=512", "--lr=1e-2")
    assert [b["block"] for b in result["blocks"]] == [0, 1, 2, 3]
    for b in result["blocks"]:
        assert b["mse_after"] < b["mse_before"] and b["rel_after"] < b["rel_before"], b
    assert result["params"]["replaced_student"] < result["params"]["replaced_dense"] / 4


@pytest.mark.parametrize("flags", [KRON, "--ks_mlp=both"])
def test_weights_regression_fits_the_matrices(teacher, tmp_path, flags):
    result = run_init(teacher, tmp_path / "student.pt", flags, "--method=weights", "--steps=60", "--lr=1e-2",
                      "--batch_size=256")
    for m in result["matrices"]:
        assert m["rel_err"] < m["rel_err_init"], m


def test_clear_errors(teacher, tmp_path):
    out = str(tmp_path / "student.pt")
    with pytest.raises(SystemExit, match="does not exist"):
        run_init(tmp_path / "missing.pt", out, KRON)
    with pytest.raises(SystemExit, match="replace no MLP matrix"):
        run_init(teacher, out, "--kron_rank=2")
    with pytest.raises(SystemExit, match="vanloan decomposes into Kronecker factors"):
        run_init(teacher, out, "--ks_mlp=proj", "--method=vanloan")
    with pytest.raises(SystemExit, match="unknown flag --kron_rnak"):
        run_init(teacher, out, "--kron_rnak=2")
    with pytest.raises(SystemExit, match="multiple of 128"):
        evaluate.main(["--checkpoint", str(teacher), "--seq_len=300"])


def test_eval_matches_the_model_loss_and_is_repeatable(shards, teacher, capsys):
    first = evaluate.main(["--checkpoint", str(teacher)])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("eval: ") and json.loads(last_line[len("eval: "):]) == first
    ckpt = tg.load_checkpoint(str(teacher))
    model = tg.build_model(tg.checkpoint_args(ckpt))
    model.load_state_dict(ckpt["model"])
    model.eval()
    tokens = tg.load_data_shard(tg.find_shards(shards[1], "val")[0]).long()
    with torch.no_grad():
        losses = [model(tokens[i:i + 1024].int(), tokens[i + 1:i + 1025], model.default_window_blocks).item()
                  for i in (0, 1024)]
    assert first["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert first["tokens"] == 2048 and first["params"] == tg.count_params(model) and first["step"] == 7
    assert evaluate.main(["--checkpoint", str(teacher)])["loss"] == first["loss"]
    short = evaluate.main(["--checkpoint", str(teacher), "--val_tokens=1024", "--seq_len=512", "--window_blocks=1"])
    with torch.no_grad():
        direct = [model(tokens[i:i + 512].int(), tokens[i + 1:i + 513], 1).item() for i in (0, 512)]
    assert short["tokens"] == 1024 and short["loss"] == pytest.approx(sum(direct) / 2, rel=1e-6)


def test_training_starts_from_the_student(teacher, tmp_path, capsys):
    """The printed flags + --init_from train, and the run's step-0 val loss is eval.py's on the student."""
    out = tmp_path / "student.pt"
    result = run_init(teacher, out, KRON, "--method=vanloan")
    # Training validates step 0 at a 1-block window; one 1024-token sequence keeps it short.
    expected = evaluate.main(["--checkpoint", str(out), "--window_blocks=1", "--val_tokens=1024"])["loss"]
    capsys.readouterr()
    code = tg.main([*result["flags"], f"--init_from={out}", f"--records_dir={tmp_path}", "--num_iterations=1",
                    "--val_tokens=1024"])
    log = capsys.readouterr().out
    assert code == 0 and "missing (fresh init): none" in log, log
    assert any(isinstance(m, KronLinear) for m in tg.build_model(tg.checkpoint_args(tg.load_checkpoint(str(out))))
               .modules())
    assert "step:0/1 val_loss:" in log and val_losses(log)[0] == pytest.approx(expected, abs=6e-5)
