"""--ks_mlp: Kronecker-sparse chains (kernels.KSLinear) as MLP matrices: build, parameter count, zero-init of the
last factor only, flag validation, and the smoke preset training with them."""
import pytest
import torch

import features.ks as ks_feature
import train_gpt as tg
from conftest import val_losses
from kernels import KSLinear, ks_param_count, monarch_patterns


def ks_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--ks_mlp=both", *extra])


@pytest.mark.parametrize("chain", ["monarch", "butterfly"])
def test_parameter_count_matches_the_patterns(chain):
    args = ks_args(f"--ks_chain={chain}", "--ks_rank=2")
    tg.check_config(args, 1)
    model = tg.build_model(args)
    dense = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
    fc, proj = model.blocks[0].mlp.c_fc, model.blocks[0].mlp.c_proj
    assert isinstance(fc, KSLinear) and isinstance(proj, KSLinear)
    assert fc.patterns == tuple(ks_feature.ks_patterns(args, 512, 128))
    assert (fc.in_features, fc.out_features) == (128, 512)
    per_block = ks_param_count(fc.patterns) + ks_param_count(proj.patterns) - 2 * 128 * 512
    assert tg.count_params(model) == tg.count_params(dense) + 4 * per_block


def test_zero_init_last_factor_only_and_the_chain_learns():
    model = tg.build_model(ks_args())
    proj = model.blocks[0].mlp.c_proj
    assert proj.factors[-1].abs().sum() == 0 and all(f.abs().sum() > 0 for f in proj.factors[:-1])
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)  # let gradients reach the blocks on the first step
    x = torch.randint(0, 50000, (257,))
    model(x[:-1], x[1:]).backward()
    assert proj.factors[-1].grad.abs().sum() > 0


def test_monarch_at_gpt2_shapes():
    assert ks_param_count(monarch_patterns(3072, 768, rank=1)) == 110_592  # vs 2,359,296 dense


def test_bad_ks_flags():
    with pytest.raises(SystemExit, match="valid values: monarch, butterfly"):
        tg.check_config(ks_args("--ks_chain=fft"), 1)
    with pytest.raises(SystemExit, match="claim the same MLP matrix"):
        tg.check_config(ks_args("--kron_mlp=proj"), 1)
    tg.check_config(ks_args("--ks_mlp=fc", "--kron_mlp=proj"), 1)  # one each is fine


def test_smoke_trains_with_ks_mlp_both(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", "--ks_mlp=both", f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4"])
    vals = val_losses(capsys.readouterr().out)
    assert code == 0 and vals[0] > 10.5 and vals[-1] < vals[0] - 2.5, vals


def test_ks_layers_factorize_only_the_listed_blocks():
    args = ks_args("--ks_layers=0,3")
    tg.check_config(args, 1)
    model = tg.build_model(args)
    patterns = ks_feature.ks_patterns
    chain = ks_param_count(patterns(args, 512, 128)) + ks_param_count(patterns(args, 128, 512))
    assert [tg.count_params(b.mlp) for b in model.blocks] == [chain, 2 * 128 * 512, 2 * 128 * 512, chain]
    assert [isinstance(b.mlp.c_fc, KSLinear) for b in model.blocks] == [True, False, False, True]
    with pytest.raises(SystemExit, match="--ks_layers names blocks \\[7\\] outside 0..3"):
        tg.check_config(ks_args("--ks_layers=2,7"), 1)
    with pytest.raises(SystemExit, match="expected comma-separated block indices"):
        tg.check_config(ks_args("--ks_layers=last"), 1)


def test_kron_and_ks_may_share_a_matrix_in_different_blocks():
    args = ks_args("--ks_layers=2,3", "--kron_mlp=both", "--kron_layers=0,1")
    tg.check_config(args, 1)
    model = tg.build_model(args)
    assert [type(b.mlp.c_proj).__name__ for b in model.blocks] == ["KronLinear", "KronLinear", "KSLinear", "KSLinear"]
    with pytest.raises(SystemExit, match="claim the same MLP matrix in blocks \\[1\\]"):
        tg.check_config(ks_args("--ks_layers=1,2", "--kron_mlp=proj", "--kron_layers=0,1"), 1)
