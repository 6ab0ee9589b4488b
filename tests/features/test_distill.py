"""features/distill.py (--teacher): the loss terms (CE, KL at temperature, cosine of hidden states) and a
distilled smoke run."""
import torch
import torch.nn.functional as F

import features.distill as distill_feature
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
