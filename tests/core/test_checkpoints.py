"""One checkpoint format: save/load round trip, resume == uninterrupted, init_from, bad checkpoints, and
knowledge distillation through a frozen teacher."""
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import summary_of


def smoke_args(*extra):
    return tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", *extra])


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    args = smoke_args()
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    x = torch.randint(0, 50000, (513,))
    tg.train_step(model, opts, [(x[:-1], x[1:])], 2, args, 0, 1)  # non-trivial optimizer state
    path = tg.save_checkpoint(tmp_path / "c.pt", model, opts, args, 1, 12.5)
    assert not (tmp_path / "c.pt.tmp").exists()
    ckpt = tg.load_checkpoint(str(path))
    assert ckpt["step"] == 1 and ckpt["train_time_ms"] == 12.5 and tg.checkpoint_args(ckpt) == args
    assert "def main(" in ckpt["code"]["train_gpt.py"] and ckpt["data"]["tokens"] == 1024
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    fresh = tg.build_model(args)
    fresh_opts = tg.build_optimizers(fresh, args)
    fresh.load_state_dict(ckpt["model"])
    for opt, state in zip(fresh_opts, ckpt["optimizers"]):
        opt.load_state_dict(state)
    for a, b in zip(opts, fresh_opts):
        for pa, pb in zip([p for g in a.param_groups for p in g["params"]],
                          [p for g in b.param_groups for p in g["params"]]):
            for key, val in a.state[pa].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(b.state[pb][key]))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        tg.load_checkpoint(str(tmp_path / "nope.pt"))
    good = tmp_path / "good.pt"
    args = smoke_args()
    model = tg.build_model(args)
    tg.save_checkpoint(good, model, tg.build_optimizers(model, args), args, 0, 0.0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        tg.load_checkpoint(str(truncated))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a train_gpt.py checkpoint"):
        tg.load_checkpoint(str(tmp_path / "other.pt"))


def test_init_from_loads_weights_and_reports(tmp_path):
    torch.manual_seed(1)
    source = tg.build_model(smoke_args())
    state = source.state_dict()
    target = tg.build_model(smoke_args())
    report = tg.load_weights(target, state)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    assert "missing (fresh init): none" in report
    wider = tg.build_model(smoke_args("--mlp_ratio=2"))
    with pytest.raises(SystemExit, match="mlp.c_fc.weight: checkpoint \\(512, 128\\) vs model \\(256, 128\\)"):
        tg.load_weights(wider, state)
    report = tg.load_weights(wider, state, partial=True)
    assert "shape-mismatched (skipped): ['blocks.0.mlp.c_fc.weight" in report
    assert torch.equal(wider.embed.weight, source.embed.weight)


def test_resume_equals_uninterrupted_and_init_from_restarts(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    common = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", "--num_iterations=6",
              "--val_every=0", "--val_tokens=1024"]
    assert tg.main(common + [f"--records_dir={tmp_path / 'a'}", "--save_every=3", "--keep_checkpoints=0",
                             "--save_checkpoint=true"]) == 0
    full = summary_of(capsys.readouterr().out)
    mid = Path(full["record"]).with_name(Path(full["record"]).stem + "_step3.pt")
    assert tg.load_checkpoint(str(mid))["step"] == 3

    assert tg.main([f"--resume={mid}", f"--records_dir={tmp_path / 'b'}", "--save_checkpoint=true"]) == 0
    out = capsys.readouterr().out
    resumed = summary_of(out)
    assert "resumed from" in out and "step:4/6" in out and "step:1/6" not in out
    assert resumed["steps"] == 6 and resumed["resumed_from"] == str(mid)
    a, b = tg.load_checkpoint(full["checkpoint"]), tg.load_checkpoint(resumed["checkpoint"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["final_val_loss"] == full["final_val_loss"]

    assert tg.main(common + ["--num_iterations=2", f"--records_dir={tmp_path / 'c'}",
                             f"--init_from={full['checkpoint']}"]) == 0
    out = capsys.readouterr().out
    assert "init_from" in out and "step:1/2" in out and "loaded" in out
    assert summary_of(out)["final_val_loss"] < full["final_val_loss"] + 0.5  # starts from trained weights
