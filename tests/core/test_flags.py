"""Flag parsing: --name=value overrides, typed values, presets applied first, clear errors."""
import dataclasses
from pathlib import Path

import pytest

import train_gpt as tg


def test_override_types():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--num_iterations=7", "--muon_lr=0.5", "--run_name=x",
                                                     "--compile=false", "--fp8_head=0"])
    assert (args.num_iterations, args.muon_lr, args.run_name, args.compile, args.fp8_head) == (7, 0.5, "x", False,
                                                                                               False)
    assert tg.apply_overrides(tg.Hyperparameters(), ["--compile=TRUE"]).compile is True
    assert tg.apply_overrides(tg.Hyperparameters(), ["--compile=1"]).compile is True


def test_unknown_flag_suggests_the_nearest_or_lists_valid_names(capsys):
    with pytest.raises(SystemExit) as e:
        tg.apply_overrides(tg.Hyperparameters(), ["--num_iteration=7"])
    assert "unknown flag --num_iteration; did you mean --num_iterations?" in str(e.value)
    with pytest.raises(SystemExit) as e:
        tg.apply_overrides(tg.Hyperparameters(), ["--zzzz=7"])
    assert "unknown flag --zzzz" in str(e.value) and "--seq_len" in str(e.value)


@pytest.mark.parametrize("bad", ["--num_iterations=seven", "--compile=yes", "--muon_lr=fast", "num_iterations=3",
                                 "--num_iterations"])
def test_unparsable_value_errors(bad):
    with pytest.raises(SystemExit) as e:
        tg.apply_overrides(tg.Hyperparameters(), [bad])
    assert "valid flags:" in str(e.value)


def test_preset_applies_first_and_explicit_flags_win():
    explicit_first = tg.apply_overrides(tg.Hyperparameters(), ["--num_layers=6", "--preset=smoke"])
    explicit_last = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--num_layers=6"])
    for args in (explicit_first, explicit_last):
        assert args.num_layers == 6 and args.model_dim == tg.PRESETS["smoke"]["model_dim"]
        assert args.vocab_size == 50257 and args.track == "local"
    with pytest.raises(SystemExit, match="valid presets: smoke"):
        tg.apply_overrides(tg.Hyperparameters(), ["--preset=tiny"])


def test_changed_flags_include_preset_values():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--seed=3"])
    changed = tg.changed_flags(args)
    assert changed["seed"] == 3 and changed["preset"] == "smoke" and changed["num_layers"] == 4
    assert "muon_lr" not in changed


def test_defaults_are_the_recipe():
    a = tg.Hyperparameters()
    assert (a.num_layers, a.model_dim, a.num_heads, a.vocab_size) == (12, 768, 6, 50257)
    assert a.seq_len * a.micro_batches == 393_216 and a.val_seq_len == 262_144 and a.val_tokens == 10_485_760
    assert (a.num_iterations, a.cooldown_frac, a.val_every) == (1770, 0.4, 125)
    assert (a.muon_lr, a.head_lr, a.embed_lr, a.scalar_lr) == (0.05, 0.008, 0.6, 0.04)
    assert (a.adam_beta1, a.adam_beta2, a.adam_eps) == (0.8, 0.95, 1e-10)


@pytest.mark.parametrize("world_size,ok", [(1, True), (2, True), (4, True), (8, True), (3, False), (6, False)])
def test_world_size_must_divide_the_batch(world_size, ok):
    args = tg.Hyperparameters(val_tokens=world_size * 262_144)
    if ok:
        tg.check_config(args, world_size)
    else:
        with pytest.raises(SystemExit, match="valid world sizes: 1, 2, 4, 8"):
            tg.check_config(args, world_size)


def test_config_errors_name_the_fix():
    with pytest.raises(SystemExit, match="multiple of the attention block size"):
        tg.check_config(tg.Hyperparameters(seq_len=1000), 1)
    with pytest.raises(SystemExit, match="must be even"):
        tg.check_config(tg.Hyperparameters(num_layers=5), 1)
    with pytest.raises(SystemExit, match="val_tokens"):
        tg.check_config(tg.Hyperparameters(val_tokens=1000), 1)


def test_readme_documents_every_flag():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(tg.Hyperparameters) if f"| `{f.name}` |" not in readme]
    assert not missing, f"README flag table lacks {missing}"
