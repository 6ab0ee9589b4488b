"""Progressive replacement (--kron_progressive_every, issue 15): dense MLPs turn into their Kronecker students one
block at a time during training, initialized by Van Loan (+ distillation on live inputs); the optimizers keep every
surviving parameter's state; the loss stays finite; resume across a swap is exact."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import features.kronecker as kron_feature
import kernels
import train_gpt as tg
from conftest import randomize_zero_matrices, smoke_args, summary_of

FLAGS = ["--kron_mlp=both", "--kron_progressive_every=2", "--kron_layers=0,1", "--num_iterations=6"]


def test_swap_schedule_and_the_model_at_each_step():
    args = smoke_args(*FLAGS)
    assert kron_feature.progressive_swaps(args) == [(2, 0), (4, 1)]
    kron_blocks = lambda step: [i for i, b in enumerate(tg.build_model(tg.args_at_step(args, step)).blocks)
                                if isinstance(b.mlp.c_fc, kernels.KronLinear)]
    # a checkpoint at step N is written before swap N: at step 2 the model is still dense
    assert kron_blocks(0) == [] and kron_blocks(2) == [] and kron_blocks(3) == [0] and kron_blocks(5) == [0, 1]
    assert tg.args_at_step(smoke_args(), 3) == smoke_args()  # off: the configuration itself
    with pytest.raises(SystemExit, match="after the run's 6 steps"):
        smoke_args("--kron_mlp=both", "--kron_progressive_every=2", "--num_iterations=6")  # 4 blocks: swap at 8
    with pytest.raises(SystemExit, match="needs --kron_mlp"):
        smoke_args("--kron_progressive_every=2")


def test_a_swap_keeps_optimizer_state_and_distillation_helps():
    args = smoke_args(*FLAGS, "--kron_progressive_distill_steps=30")
    torch.manual_seed(0)
    model = randomize_zero_matrices(tg.build_model(tg.args_at_step(args, 0)))  # dense at step 0
    optimizers = tg.build_optimizers(model, args)
    x = torch.randint(0, 50000, (2, 513), generator=torch.Generator().manual_seed(0))
    batch = [(x[0, :-1], x[0, 1:]), (x[1, :-1], x[1, 1:])]
    for step in range(2):
        tg.train_step(model, optimizers, batch, 1, args, step, 1)
    dense = model.blocks[0].mlp
    survivors = {id(p): optimizers[1].state[p] for p in model.blocks[1].parameters() if p in optimizers[1].state}
    assert survivors and dense.c_fc.weight in optimizers[1].state
    swap = kron_feature.ProgressiveReplacement(model, args, tg.DistEnv(0, 1, 0, torch.device("cpu")))
    live = swap.live_inputs(0, batch[0], 1)
    vanloan = tg.build_mlp(args, 0)
    swap.initialize(vanloan, dense)
    before = F.mse_loss(vanloan(live), dense(live)).item()

    swap.at(2, optimizers, batch, 1)
    student = model.blocks[0].mlp
    assert isinstance(student.c_fc, kernels.KronLinear) and student is not dense
    after = F.mse_loss(student(live), dense(live)).item()
    assert after < 0.98 * before  # distillation on the live inputs improved on Van Loan (measured: -7.5%)
    owned = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len(set(map(id, owned))) == len(list(model.parameters()))
    assert all(any(p is q for q in owned) for p in model.parameters())
    assert not any(p is dense.c_fc.weight for p in owned)
    for p in model.blocks[1].parameters():  # surviving parameters keep their Muon state objects
        if id(p) in survivors:
            assert optimizers[1].state[p] is survivors[id(p)]
    loss = tg.train_step(model, optimizers, batch, 1, args, 2, 1)
    assert torch.isfinite(loss)


def test_resume_across_a_swap_is_exact(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    common = ["--preset=smoke", f"--train_files={train}", f"--val_files={val}", "--val_every=0",
              "--val_tokens=1024", *FLAGS, "--kron_progressive_distill_steps=5"]
    assert tg.main(common + [f"--records_dir={tmp_path / 'a'}", "--save_every=1", "--keep_checkpoints=0",
                             "--save_checkpoint=full"]) == 0
    full = summary_of(capsys.readouterr().out)
    assert full["status"] == "ok" and full["final_val_loss"] < 10.8
    a = tg.load_checkpoint(full["checkpoint"])
    assert "blocks.1.mlp.c_fc.A" in a["model"]
    # step 3: between the swaps; step 2: written at a swap step, before that swap (the model is still dense)
    for step in (3, 2):
        mid = Path(full["record"]).with_name(Path(full["record"]).stem + f"_step{step}.pt")
        assert ("blocks.0.mlp.c_fc.A" in tg.load_checkpoint(str(mid))["model"]) == (step == 3)
        assert tg.main([f"--resume={mid}", f"--records_dir={tmp_path / f'b{step}'}", "--save_checkpoint=full"]) == 0
        resumed = summary_of(capsys.readouterr().out)
        b = tg.load_checkpoint(resumed["checkpoint"])
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (step, k)
        assert resumed["final_val_loss"] == full["final_val_loss"]
