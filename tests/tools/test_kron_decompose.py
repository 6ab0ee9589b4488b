"""tools/kron_decompose.py: what it prints at the end is a command that builds a model the written weights fit."""
import shlex

import pytest
import torch

import train_gpt as tg
from conftest import load_script


@pytest.fixture(scope="module")
def kron_decompose():
    return load_script("tools/kron_decompose.py")


def test_prints_where_it_wrote_and_a_command_that_loads_it(kron_decompose, tmp_path, capsys):
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--run_name=dense", "--save_every=5",
                                                     "--save_checkpoint=full", f"--records_dir={tmp_path}"])
    dense = tg.build_model(args)
    tg.save_checkpoint(tmp_path / "dense.pt", dense, tg.build_optimizers(dense, args), args, 5, 1.0)
    out = tmp_path / "kron.pt"
    command = kron_decompose.main(["--checkpoint", str(tmp_path / "dense.pt"), "--out", str(out), "--rank", "2"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and command in printed

    words = shlex.split(command)
    assert words[:3] == ["python", "train_gpt.py", "--preset=smoke"]  # flags relative to the source's preset
    flags = dict(w[2:].split("=", 1) for w in words[2:])
    assert flags["init_from"] == str(out) and flags["run_name"] == "dense_kron_r2"
    assert flags["kron_mlp"] == "both" and flags["kron_rank"] == "2"
    assert not {"save_every", "save_checkpoint", "records_dir", "resume"} & set(flags)  # bookkeeping left out
    student_args = tg.apply_overrides(tg.Hyperparameters(), words[2:])
    tg.check_config(student_args, 1)
    assert (student_args.num_layers, student_args.model_dim) == (args.num_layers, args.model_dim)
    student = tg.build_model(student_args)
    report = tg.load_weights(student, tg.load_checkpoint(str(out))["model"])  # shapes must match exactly
    assert "missing (fresh init): none" in report and "unexpected (ignored): none" in report
    assert torch.equal(student.embed.weight, dense.embed.weight)


def test_bare_state_dict_and_no_mlp_weights(kron_decompose, tmp_path, capsys):
    torch.save({"h.0.mlp.c_fc.weight": torch.randn(8, 4)}, tmp_path / "bare.pt")
    assert kron_decompose.main(["--checkpoint", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "o.pt")]) is None
    assert "bare state dict" in capsys.readouterr().out and (tmp_path / "o.pt").exists()
    torch.save({"lm_head.weight": torch.randn(8, 4)}, tmp_path / "none.pt")
    with pytest.raises(SystemExit, match="no 2-D weight named"):
        kron_decompose.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "n.pt")])
    assert not (tmp_path / "n.pt").exists()
