"""tools/mlp_init.py (a Kronecker / KS student from a dense checkpoint) and tools/eval.py (a checkpoint's val loss),
on the smoke model with random weights and random-token shards."""
import json

import pytest
import torch

import train_gpt as tg
from conftest import load_script, val_losses, write_shard
from kernels import KronLinear, kron_dense_weight, van_loan_decompose

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


def test_magnitude_prune_zeroes_the_smallest_entries():
    W = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert mlp_init.magnitude_prune(W, 0.5).tolist() == [[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]
    assert torch.equal(mlp_init.magnitude_prune(W, 0.0), W)
    assert W[0, 0] == 0.5  # a copy


def test_prune_before_vanloan_reports_the_errors(teacher, tmp_path, capsys):
    """--prune 0.5: each student matrix is Van Loan's optimum for the pruned matrix; the report gives pruning's own
    error and the decomposition's error against the pruned and the original matrix."""
    plain = run_init(teacher, tmp_path / "plain.pt", KRON, "--method=vanloan")
    capsys.readouterr()
    pruned = run_init(teacher, tmp_path / "pruned.pt", KRON, "--method=vanloan", "--prune=0.5")
    report = capsys.readouterr().out
    dense = tg.load_checkpoint(str(teacher))["model"]
    student = tg.load_checkpoint(str(tmp_path / "pruned.pt"))["model"]
    for m, m_plain in zip(pruned["matrices"], plain["matrices"]):
        W = dense[f"{m['name']}.weight"].float()
        kept = W.abs() > W.abs().flatten().kthvalue(W.numel() // 2).values  # no ties among random floats
        W_p = W * kept
        A, B = student[f"{m['name']}.A"], student[f"{m['name']}.B"]
        W_s = kron_dense_weight(A, B)
        A_opt, B_opt = van_loan_decompose(W_p.double(), *A.shape[1:], *B.shape[1:], rank=A.shape[0])
        assert m["prune"] == 0.5 and m["prune_err"] == pytest.approx(((W_p - W).norm() / W.norm()).item(), rel=1e-5)
        assert m["rel_err_pruned"] == pytest.approx(((W_s - W_p).norm() / W_p.norm()).item(), rel=1e-4)
        optimum = (kron_dense_weight(A_opt, B_opt) - W_p.double()).norm() / W_p.norm()
        assert m["rel_err_pruned"] == pytest.approx(optimum.item(), rel=1e-4)
        assert m["rel_err"] == pytest.approx(((W_s - W).norm() / W.norm()).item(), rel=1e-4)
        assert m_plain["rel_err"] <= m["rel_err"] + 1e-6  # Van Loan of W itself is the optimum on W
        assert "prune" not in m_plain
        assert f"{m['name']}: kron" in report and f"pruning alone {m['prune_err']:.4f}" in report


def test_prune_before_distill_prunes_the_teacher(shards, teacher, tmp_path):
    """Distillation's targets come from the teacher with its replaced matrices pruned: find_replaced + prune_replaced
    write them into the teacher's layers, and a --prune distill run reports the prune errors."""
    ckpt = tg.load_checkpoint(str(teacher))
    model = tg.build_model(tg.checkpoint_args(ckpt))
    model.load_state_dict(ckpt["model"])
    student = tg.build_model(mlp_init.student_config(tg.checkpoint_args(ckpt), "--kron_mlp=fc --kron_rank=2"))
    replaced = mlp_init.find_replaced(model, student)
    mlp_init.prune_replaced(replaced, 0.25, write_teacher=True)
    for r in replaced:
        weight = model.blocks[r.block].mlp.c_fc.weight
        assert torch.equal(weight, r.dense) and (weight == 0).sum() == round(0.25 * weight.numel())
        assert torch.equal(r.original, ckpt["model"][f"{r.name}.weight"])
    assert torch.equal(model.blocks[0].mlp.c_proj.weight, ckpt["model"]["blocks.0.mlp.c_proj.weight"])
    result = run_init(teacher, tmp_path / "student.pt", "--ks_mlp=proj", "--prune=0.25", "--tokens=1024",
                      "--seq_len=512", "--steps=10", "--batch_size=256")
    assert all(m["prune_err"] > 0 and "rel_err_pruned" in m for m in result["matrices"])
    assert all(b["mse_after"] < b["mse_before"] for b in result["blocks"])


def test_prune_clear_errors(shards, teacher, tmp_path):
    out = str(tmp_path / "student.pt")
    with pytest.raises(SystemExit, match=r"--prune=1.0 must be in \[0, 1\)"):
        run_init(teacher, out, KRON, "--prune=1")
    kron_teacher = save_teacher(tmp_path / "kron.pt", tg.apply_overrides(teacher_args(shards),
                                                                         ["--kron_mlp=fc", "--kron_rank=1"]))
    with pytest.raises(SystemExit, match="teacher's blocks.0.mlp.c_fc is a KronLinear .*use --method vanloan"):
        run_init(kron_teacher, out, "--kron_rank=2", "--prune=0.5")


def test_suggested_command_starts_a_fresh_run(shards, tmp_path):
    """The teacher's run_name and save flags stay behind: the command (and the student's stored flags) get a new
    run_name and the defaults for save_every / save_checkpoint, unless --student_flags set them."""
    args = tg.apply_overrides(teacher_args(shards), ["--save_every=5", "--save_checkpoint=full", "--run_name=dense"])
    path = save_teacher(tmp_path / "dense.pt", args)
    result = run_init(path, tmp_path / "student.pt", KRON, "--method=vanloan")
    assert "--run_name=dense_kron_mlp=both_kron_rank=2" in result["flags"]
    assert not any(f.startswith(("--save_every", "--save_checkpoint", "--resume")) for f in result["flags"])
    stored = tg.checkpoint_args(tg.load_checkpoint(str(tmp_path / "student.pt")))
    assert (stored.run_name, stored.save_every, stored.save_checkpoint) == ("dense_kron_mlp=both_kron_rank=2", 0, "off")
    mine = run_init(path, tmp_path / "mine.pt", f"{KRON} --run_name=mine --save_every=3", "--method=vanloan")
    assert "--run_name=mine" in mine["flags"] and "--save_every=3" in mine["flags"]
