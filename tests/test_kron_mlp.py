"""--kron_mlp: Kronecker-factorized MLP matrices in the model (kernels.KronLinear), parameter count, optimizer
routing, zero-init of c_proj, and the smoke preset training with them."""
import pytest
import torch

import train_gpt as tg
from conftest import val_losses
from kernels import KronLinear, kron_param_count


def kron_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--kron_mlp=both", *extra])


def test_parameter_count_matches_the_formula():
    torch.manual_seed(0)
    for mode, fc, proj in (("both", True, True), ("fc", True, False), ("proj", False, True)):
        args = kron_args(f"--kron_mlp={mode}", "--kron_rank=2", "--kron_factors=16,8,32,16;8,16,16,32")
        model = tg.build_model(args)
        dense = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
        d, h, L = 128, 512, 4
        delta = (fc * (kron_param_count(16, 8, 32, 16, 2) - h * d) + proj * (kron_param_count(8, 16, 16, 32, 2) - d * h))
        assert tg.count_params(model) == tg.count_params(dense) + L * delta
        assert isinstance(model.blocks[0].mlp.c_fc, KronLinear) == fc
        assert isinstance(model.blocks[0].mlp.c_proj, KronLinear) == proj


def test_c_proj_starts_at_zero_with_one_live_factor():
    torch.manual_seed(0)
    model = tg.build_model(kron_args())
    proj = model.blocks[0].mlp.c_proj
    assert proj.B.abs().sum() == 0 and proj.A.abs().sum() > 0  # one factor zero, the other random
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)  # a zero head would stop every gradient before the blocks
    grads = []
    for seed in (1, 2):
        x = torch.randint(0, 50000, (257,), generator=torch.Generator().manual_seed(seed))
        model.zero_grad()
        model(x[:-1], x[1:]).backward()
        grads.append(proj.B.grad.clone())
    # the zero factor learns (it would not if both were zero), from what the inputs are
    assert all(g.abs().sum() > 0 for g in grads) and not torch.allclose(grads[0], grads[1])
    assert proj.A.grad.abs().sum() == 0  # dA = 0 while B = 0: B moves first


def test_factors_go_to_the_chosen_optimizer():
    model = tg.build_model(kron_args())
    kron_ids = {id(p) for m in model.modules() if isinstance(m, KronLinear) for p in (m.A, m.B)}
    muon = tg.build_optimizers(model, kron_args("--kron_optimizer=muon"))[1]
    assert kron_ids <= {id(p) for g in muon.param_groups for p in g["params"]}
    adam, muon = tg.build_optimizers(model, kron_args("--kron_optimizer=adam"))
    assert not kron_ids & {id(p) for g in muon.param_groups for p in g["params"]}
    assert kron_ids == {id(p) for p in adam.param_groups[-1]["params"]}


def test_bad_kron_flags_name_the_fix():
    with pytest.raises(SystemExit, match="valid values: off, fc, proj, both"):
        tg.check_config(kron_args("--kron_mlp=all"), 1)
    with pytest.raises(SystemExit, match="need m1\\*m2=512"):
        tg.check_config(kron_args("--kron_factors=16,8,16,16;8,16,16,32"), 1)
    with pytest.raises(SystemExit, match="expected 'm1,k1,m2,k2;m1,k1,m2,k2'"):
        tg.check_config(kron_args("--kron_factors=16,8"), 1)


def test_smoke_trains_with_kron_mlp_both(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", "--kron_mlp=both", f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4"])
    out = capsys.readouterr().out
    vals = val_losses(out)
    assert code == 0 and "KronLinear layers" in out
    assert vals[0] > 10.5 and vals[-1] < vals[0] - 2.5, vals


def test_kron_decompose_output_feeds_init_from(tmp_path):
    from conftest import load_script
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"])
    dense = tg.build_model(args)
    tg.save_checkpoint(tmp_path / "dense.pt", dense, tg.build_optimizers(dense, args), args, 5, 1.0)
    load_script("tools/kron_decompose.py").main(["--checkpoint", str(tmp_path / "dense.pt"),
                                                "--out", str(tmp_path / "kron.pt"), "--rank", "2"])
    student = tg.build_model(kron_args("--kron_rank=2"))
    report = tg.load_weights(student, tg.load_checkpoint(str(tmp_path / "kron.pt"))["model"])
    assert "missing (fresh init): none" in report and "unexpected (ignored): none" in report
    assert torch.equal(student.embed.weight, dense.embed.weight)
