"""features/distill.py (--teacher): the loss terms (CE, KL at temperature, cosine of hidden states) and a
distilled smoke run."""
import torch
import torch.nn.functional as F

import features.distill as distill_feature
from features.fp8_mlp import FP8MLP
import train_gpt as tg
from conftest import randomize_zero_matrices, summary_of


def smoke_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", *extra])


def test_distillation_loss_terms():
    torch.manual_seed(2)
    args = smoke_args()
    student, other = tg.build_model(args), tg.build_model(args)
    for m in (student, other):
        randomize_zero_matrices(m, 0.05)  # with a zero head every distribution would be uniform
    x = torch.randint(0, 50000, (257,))
    inputs, targets = x[:-1], x[1:]
    ce = F.cross_entropy(student(inputs), targets)
    plain = distill_feature.Distiller(student, other, smoke_args("--kd_alpha=0")).train()
    torch.testing.assert_close(plain(inputs, targets), ce)
    twin = tg.build_model(args)
    twin.load_state_dict(student.state_dict())
    self_taught = distill_feature.Distiller(student, twin, smoke_args("--kd_alpha=1")).train()
    assert self_taught(inputs, targets, window_blocks=student.default_window_blocks).abs() < 1e-5  # KL(p || p) = 0
    kd = distill_feature.Distiller(student, other, smoke_args("--kd_alpha=0.5", "--kd_cosine=0.1")).train()
    loss = kd(inputs, targets)
    assert loss > 0.5 * ce
    loss.backward()
    assert all(p.grad is None for p in other.parameters())
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert not kd.teacher.training and kd.student.training
    kd.eval()
    torch.testing.assert_close(kd(inputs, targets), student.eval()(inputs, targets))  # validation: student only


def test_distillation_run(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    common = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", "--val_every=0",
              "--val_tokens=1024"]
    assert tg.main(common + ["--num_iterations=4", f"--records_dir={tmp_path}", "--save_checkpoint=true"]) == 0
    teacher = summary_of(capsys.readouterr().out)["checkpoint"]
    assert tg.main(common + ["--num_iterations=3", f"--records_dir={tmp_path}", f"--teacher={teacher}",
                             "--model_dim=64", "--kd_cosine=0.5"]) == 0
    out = capsys.readouterr().out
    assert "distillation: teacher" in out and "teacher forward:" in out and summary_of(out)["status"] == "ok"


def test_the_teacher_is_placed_as_main_places_its_own_flags_then_all_bf16_on_a_gpu(monkeypatch):
    """place_teacher: train_gpt.place_model's decisions for the teacher's own flags (bf16 embeddings, its
    --param_dtype, its --fp8_head/--fp8_mlp switches), then every other parameter in bf16. Without CUDA, a GPU with
    FP8 matmuls is stood in for by set_gpu_dtypes(on_gpu=True, fp8_matmuls=True): place_model less the move."""
    monkeypatch.setattr(distill_feature, "place_model",
                        lambda model, args, device: tg.set_gpu_dtypes(model, args, on_gpu=True, fp8_matmuls=True))
    for flags in (["--param_dtype=record", "--fp8_head=true", "--fp8_mlp=true"], ["--fp8_head=false"]):
        teacher_args = smoke_args(*flags)
        by_main = tg.set_gpu_dtypes(tg.build_model(teacher_args), teacher_args, on_gpu=True, fp8_matmuls=True)
        teacher = distill_feature.place_teacher(tg.build_model(teacher_args), teacher_args, torch.device("cuda"))
        assert teacher.embed.weight.dtype == by_main.embed.weight.dtype == torch.bfloat16
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}, flags
        assert teacher.lm_head.use_fp8 == by_main.lm_head.use_fp8 == teacher_args.fp8_head, flags
        fp8_mlps = [m.use_fp8 for m in teacher.modules() if isinstance(m, FP8MLP)]
        assert fp8_mlps == [m.use_fp8 for m in by_main.modules() if isinstance(m, FP8MLP)]
        assert fp8_mlps == ([True] * teacher_args.num_layers if teacher_args.fp8_mlp else []), flags


def test_a_teacher_on_the_cpu_is_the_fp32_checkpoint_in_eval(tmp_path):
    """build_teacher on the CPU: the checkpoint's model unchanged (fp32, no FP8), frozen in eval; its forward with
    the FP8 switches on (as a GPU with FP8 matmuls would set them) is the plain one, since they act only in
    training."""
    torch.manual_seed(3)
    teacher_args = smoke_args("--fp8_head=true", "--fp8_mlp=true")
    trained = tg.build_model(teacher_args)
    randomize_zero_matrices(trained, 0.05)
    path = tg.save_checkpoint(tmp_path / "teacher.pt", trained, [], teacher_args, step=0, train_time_ms=0.0,
                              weights_only=True)
    teacher = distill_feature.build_teacher(str(path), tg.build_model(smoke_args()), torch.device("cpu"))
    assert not teacher.training and {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert not teacher.lm_head.use_fp8
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[name], tensor, rtol=0, atol=0)
    inputs = torch.randint(0, 50000, (256,))
    plain = teacher(inputs)
    tg.set_gpu_dtypes(teacher, teacher_args, on_gpu=False, fp8_matmuls=True)
    assert teacher.lm_head.use_fp8 and any(isinstance(m, FP8MLP) and m.use_fp8 for m in teacher.modules())
    torch.testing.assert_close(teacher(inputs), plain, rtol=0, atol=0)
