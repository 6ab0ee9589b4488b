"""Frontier I (issue 13): the data, schedule and optimizer half of the post-#21 recipe. Reference values from
../shared/docs/frontier_recipe.md; hand-computed examples for Polar Express, NorMuon, cautious weight decay, YaRN
and the document-aligned loader; end-to-end: frontier_smoke trains, resumes exactly across a stage boundary, and
1 process equals 2."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import features.cautious_adam as cautious_adam_feature
import features.normuon as normuon_feature
import features.polar_express as polar_express_feature
import features.yarn as yarn_feature
import train_gpt as tg
from conftest import frontier_args as frontier, load_script, smoke_args, smoke_model, summary_of

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def test_lr_multiplier_reference_values():
    args = frontier()
    expected = {600: 1.3546, 846: 0.9123, 847: 1.0271, 1000: 0.7098, 1269: 0.1521, 1270: 0.15, 1284: 0.15}
    for step, value in expected.items():
        assert tg.lr_multiplier(step, args) == pytest.approx(value, abs=5e-5), step
    assert tg.lr_multiplier(0, args) == 1.0 and tg.lr_multiplier(507, args) == 1.52  # cooldown starts at 508
    assert tg.lr_multiplier(423, args) == 1.52 and tg.lr_multiplier(422, args) == 1.0  # stage boundaries
    assert tg.total_steps(args) == 1285


def test_stages_windows_tokens_and_momentum():
    args = frontier()
    stages = tg.training_stages(args)
    assert [(s.start, s.end) for s in stages] == [(0, 423), (423, 847), (847, 1270), (1270, 1285)]
    assert [(s.seq_len, s.doc_cap, s.short, s.long) for s in stages] == [
        (16384, 896, 1, 3), (32768, 2048, 3, 7), (49152, 2048, 5, 11), (49152, 2048, 6, 13)]
    assert tg.window_at(0, args) == (3, 1) and tg.window_at(1284, args) == (13, 6)
    assert tg.window_at(1285, args, final=True) == (20, 6)
    assert tg.tokens_after(1285, args) == 423 * 131072 + 424 * 262144 + 423 * 393216 + 15 * 393216
    assert tg.tokens_after(1285, args) == pytest.approx(338.8e6, rel=1e-3)  # the recipe's 338.8 M tokens
    # NorMuon momentum: 0.85 -> 0.95 over 300 steps, 0.95, then back to 0.85 over the last 50 (1235 -> 1285)
    assert [tg.muon_momentum(s, args) for s in (0, 150, 300, 1235)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert tg.muon_momentum(1260, args) == pytest.approx(0.90) and tg.muon_momentum(1284, args) == pytest.approx(
        0.852)
    table = tg.stage_table(args)
    assert "423-846 | 262,144 | 32768 | 2048 | 3/7 | 1.52" in table and "ext: 1270-1284" in table


def test_default_schedule_is_unchanged():
    args = tg.Hyperparameters()
    assert tg.training_stages(args) == () and tg.total_steps(args) == 1770
    assert tg.window_at(885, args) == tg.long_window_blocks(885, args) == 7
    assert tg.tokens_after(10, args) == 10 * 8 * 49152 and tg.lr_multiplier(1770, args) == pytest.approx(0.1)


@pytest.mark.parametrize("flags, message", [
    (["--stages=16384:896:1-3:1.0", "--bos_align=false"], "needs --bos_align"),
    (["--stages=16384:896:3-1:1.0"], "short-long"),
    (["--stages=16384:896:1-3"], "seq_len:doc_cap:short-long:lr_mult"),
    (["--stages=1000:896:1-3:1.0"], "multiple of 128"),
    (["--stages=", "--extension_steps=3"], "needs --stages"),
    (["--ns_steps=6"], "ns_steps=6 must be <= 5"),
    (["--adam_group_betas=hed=0.5/0.9"], "unknown Adam group 'hed'"),
    (["--save_every=25"], "multiple of --adam_every=2"),
    (["--softcap=tanh"], "valid values: r21, frontier"),
])
def test_bad_schedule_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):  # (the loss weights' stage count is not what is tested here)
        frontier("--mtp_weights=", "--prefix_weights=", *flags)


# ---------------------------------------------------------------------------------------------------------------
# YaRN


def test_rope_canonical_rotates_every_dim():
    rotary = tg.Rotary(64, 16, canonical=True)
    assert rotary.frequencies()[1].item() == pytest.approx(10000 ** (-2 / 64)) and rotary.frequencies().min() > 0
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--rope=canonical"])
    model = tg.build_model(args)
    assert all(b.attn.rotary.canonical for b in model.blocks if b.attn is not None)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers


def test_muon_cautious_weight_decay_only_where_signs_agree():
    p = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    u = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])  # agrees with W at (0, 0) and (1, 1)
    group = dict(lr=0.1, lr_mult=1.0, weight_decay=1.2)
    expected = p - 1.2 * 0.1 * 0.1 * p * torch.tensor([[1.0, 0.0], [0.0, 1.0]]) - 0.1 * u
    tg.Muon._apply(group, [p], u[None])
    assert torch.allclose(p, expected)


def test_adam_group_settings_and_c_proj_lr():
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    model = tg.build_model(args)
    adam, muon = tg.build_optimizers(model, args)
    groups = {g["name"]: g for g in adam.param_groups}
    assert isinstance(adam, cautious_adam_feature.CautiousAdam) and groups["head"]["betas"] == (0.5, 0.95)
    assert groups["head"]["weight_decay"] == pytest.approx(0.005 * 150) and groups["scalars"]["weight_decay"] == 0
    assert groups["value_embeds"]["lr"] == 0.6 and groups["value_embeds"]["betas"] == (0.75, 0.95)
    proj = {id(b.mlp.c_proj.weight) for b in model.blocks}
    for g in muon.param_groups:
        assert g["lr_mult"] == (4.0 if any(id(p) in proj for p in g["params"]) else 1.0)
        assert all((id(p) in proj) == (g["lr_mult"] == 4.0) for p in g["params"])
    assert muon.orthogonalize is polar_express_feature.zeropower_polar_express
    assert isinstance(muon.normalize, normuon_feature.NorMuon)
    default_adam = tg.build_optimizers(tg.build_model(tg.Hyperparameters(num_layers=2, num_value_embeds=1)),
                                       tg.Hyperparameters(num_layers=2, num_value_embeds=1))[0]
    assert type(default_adam) is torch.optim.Adam


def test_adam_every_two_steps_sums_gradients():
    """Adam steps at odd steps on the sum of both steps' gradients; Muon every step."""
    args = smoke_args("--adam_every=2")
    model = smoke_model("--adam_every=2")  # zero matrices randomized: every parameter gets a gradient
    adam, muon = tg.build_optimizers(model, args)
    x = torch.randint(0, 50000, (2, 513), generator=torch.Generator().manual_seed(0))
    head = model.lm_head.weight
    matrix = model.blocks[0].mlp.c_fc.weight
    h0, m0 = head.detach().clone(), matrix.detach().clone()
    tg.train_step(model, [adam, muon], [(x[0, :-1], x[0, 1:])], 1, args, 0, 1)
    assert torch.equal(head, h0) and not torch.equal(matrix, m0)  # step 0: Muon only
    assert head.grad is not None and matrix.grad is None  # Adam's gradient waits
    first = head.grad.clone()
    twin = copy.deepcopy(model)  # the second step's own gradient, from the weights Muon just moved
    twin.zero_grad(set_to_none=True)
    (twin(x[1, :-1], x[1, 1:], 1) / args.micro_batches).backward()
    seen = []
    adam.register_step_pre_hook(lambda *_: seen.append(head.grad.clone()))
    tg.train_step(model, [adam, muon], [(x[1, :-1], x[1, 1:])], 1, args, 1, 1)
    assert not torch.equal(head, h0) and head.grad is None
    assert torch.allclose(seen[0], first + twin.lm_head.weight.grad)
    assert torch.allclose(adam.state[head]["exp_avg"], (1 - args.adam_beta1) * seen[0])


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def shakespeare_documents(tmp_path_factory):
    """Tiny Shakespeare split into documents at blank lines (the aligned loader needs many documents)."""
    if not SHAKESPEARE.exists():
        pytest.skip("../shared/data/tinyshakespeare.txt is missing")
    out = tmp_path_factory.mktemp("shakespeare_docs")
    load_script("data/tokenize_text.py").main([str(SHAKESPEARE), "--out_dir", str(out), "--name", "docs",
                                               "--separator", r"\n\n", "--val_tokens", "16384"])
    return str(out / "docs_train_*.bin"), str(out / "docs_val_*.bin")


def test_frontier_smoke_trains_end_to_end(shakespeare_documents, tmp_path, capsys):
    train, val = shakespeare_documents
    assert tg.main(["--preset=frontier_smoke", f"--train_files={train}", f"--val_files={val}",
                    f"--records_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    summary = summary_of(out)
    assert summary["status"] == "ok" and summary["steps"] == 33
    assert summary["tokens"] == 10 * 512 + 10 * 1024 + 13 * 1536 and summary["tokens_per_step"] == 1536
    assert summary["final_val_loss"] < 7.5  # from 10.83 at step 0
    assert Path(summary["record"]).parent.parent == tmp_path / "local"  # a CPU run: git-ignored records/local
    assert "stages: steps" in out and "ext: 30-32" in out and "final validation windows 3/6" in out
    run = load_script("tools/records.py").parse_record(summary["record"])  # compare plots at equal tokens
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    assert [p[1] for p in run.val_points] == [tg.tokens_after(s, args) for s in (0, 10, 20, 30, 33)]


SHORT = ["--preset=frontier_smoke", "--num_iterations=6", "--extension_steps=2", "--val_every=0",
         "--val_tokens=2048", "--stages=256:256:1-1:1.0,512:384:1-3:1.52,512:384:2-4:1.73",
         "--untie_step=5"]  # stage 3 is steps 4-5: the untie at its first step where Adam updates, as in the recipe


def test_frontier_resume_across_a_stage_boundary_is_exact(shakespeare_documents, tmp_path, capsys):
    train, val = shakespeare_documents
    common = SHORT + [f"--train_files={train}", f"--val_files={val}"]
    assert tg.main(common + [f"--records_dir={tmp_path / 'a'}", "--save_every=2", "--keep_checkpoints=0",
                             "--save_checkpoint=full"]) == 0
    full = summary_of(capsys.readouterr().out)
    mid = Path(full["record"]).with_name(Path(full["record"]).stem + "_step2.pt")  # stage 2 starts at step 2
    assert tg.load_checkpoint(str(mid))["data"]["tokens"] == 2 * 2 * 256
    assert tg.main([f"--resume={mid}", f"--records_dir={tmp_path / 'b'}", "--save_checkpoint=full"]) == 0
    resumed = summary_of(capsys.readouterr().out)
    a, b = tg.load_checkpoint(full["checkpoint"]), tg.load_checkpoint(resumed["checkpoint"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["final_val_loss"] == full["final_val_loss"] and resumed["steps"] == 8
    # the resumed span crossed the untie (step 5) too: the embedding left the head's rows and has its own Adam state
    assert not torch.equal(b["model"]["embed.weight"], b["model"]["lm_head.weight"][:tg.GPT2_VOCAB])


def test_pending_adam_gradients_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--adam_every=2"])
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    x = torch.randint(0, 50000, (513,))
    tg.train_step(model, opts, [(x[:-1], x[1:])], 1, args, 0, 1)  # step 0: Adam's gradients wait
    pending = tg.pending_gradients(opts[0], 1)
    assert pending is not None and torch.equal(pending[0], model.lm_head.weight.grad)
    path = tg.save_checkpoint(tmp_path / "c.pt", model, opts, args, 1, 0.0, pending_grads=pending)
    assert torch.equal(tg.load_checkpoint(str(path))["pending_grads"][0], pending[0])


def test_one_process_equals_two(shakespeare_documents, tmp_path):
    """The aligned loader, deferred Adam gradient reduction and NorMuon's state on 2 gloo ranks give the 1-process
    result up to float summation order."""
    train, val = shakespeare_documents
    flags = SHORT + [f"--train_files={train}", f"--val_files={val}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    losses = []
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train_gpt.py", *flags, f"--records_dir={tmp_path / str(nproc)}"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summary = summary_of(out.stdout)
        assert summary["world_size"] == nproc
        losses.append(summary["final_val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=2e-3)


@pytest.mark.slow  # three inductor compiles (~2 minutes on 2 cores)
def test_compiled_stages_one_graph_each_and_yarn_updates_reach_it(monkeypatch):
    """What main() does on a GPU, on CPU (compiled forward with FlexAttention BlockMasks): one graph per stage
    length; the extension stage (same length, new windows) and YaRN's in-place buffer updates reuse it, and the
    compiled outputs follow the new buffers (eager dense-mask reference at every stage)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from conftest import randomize_zero_matrices
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    torch.manual_seed(0)
    model = randomize_zero_matrices(tg.build_model(args)).eval()
    rotary, windows = yarn_feature.RotaryWindows(model, args), tg.WindowTensors(args, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cases = []
    for step in (0, 10, 20, 30, 31):  # stages 1, 2, 3, extension (twice)
        x = torch.randint(0, 50000, (tg.sequence_length(step, args),), generator=gen)
        x[::97] = tg.EOT_TOKEN  # several documents
        cases.append((step, x))
    with torch.no_grad():
        refs = []
        for step, x in cases:
            rotary.set(step)
            refs.append(model(x, None, windows[step]))
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        monkeypatch.setattr(tg, "FLEX_ATTENTION_ON_CPU", True)
        rotary.history = None
        for (step, x), ref in zip(cases, refs):
            rotary.set(step)
            torch.testing.assert_close(compiled(x, None, windows[step]), ref, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 3  # lengths 256, 512, 768; the extension reuses 768's graph
    assert rotary.rotaries[0].gain.item() > 1  # YaRN did change the buffers the graphs read
