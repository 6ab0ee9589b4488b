"""tools/memory_plan.py (preflight --plan): the exact counts against the tensors a real CPU step makes, the meta-device
measurements against the same measurements on real CPU tensors, the block masks against their formula, and whole
plans of the default and frontier presets."""
import json

import pytest
import torch

import train_gpt as tg
from conftest import load_script, smoke_args

mp = load_script("tools/memory_plan.py")
pf = load_script("tools/preflight.py")
NO_FP8 = mp.GPUS["a100-80"]  # no FP8 matmuls: the CPU runs the same (bf16) paths


def cpu_model(args):
    """The model built for real on the CPU, in the dtypes it has on a GPU (bf16 embeddings, ...)."""
    torch.manual_seed(0)
    return tg.set_gpu_dtypes(tg.build_model(args), args, on_gpu=True, fp8_matmuls=mp.has_fp8(NO_FP8))


SMALL_VOCAB = "--vocab_size=1024"  # the CPU runs' cost is mostly the head; the counts hold at any vocabulary


def micro_batches(args, count, seq_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (count, seq_len + 1), generator=gen)
    return [(t[:-1].int(), t[1:]) for t in ids]


def state_tensor_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("preset", ["smoke", "frontier_smoke"])
def test_optimizer_state_equals_the_tensors_of_real_steps(preset):
    # smoke: torch's Adam, bf16 embeddings, an fp32 head; frontier_smoke: CautiousAdam, NorMuon, Q/K pair splits,
    # the record's bf16 tensors. --untie_step=1 with Adam every 2 steps: the embedding gets its own Adam state (the
    # head's, copied) at the first Adam update, step 1, the case the plan counts
    args = smoke_args(f"--preset={preset}", "--untie_step=1", "--adam_every=2", "--head_init_std=0.005", SMALL_VOCAB,
                      "--micro_batches=1")
    model = cpu_model(args)
    adam, muon = optimizers = tg.build_optimizers(model, args)
    window = mp.window_tensors(tg.window_at(0, args), "cpu")
    for step in range(2):
        tg.train_step(model, optimizers, micro_batches(args, 1, 128, seed=step), window, args, step, 1)
    every = {id(p) for p in model.parameters()}
    assert all(p in adam.state for g in adam.param_groups for p in g["params"])
    assert mp.adam_state_bytes(adam, every, {id(model.embed.weight): model.lm_head.weight}) == \
        state_tensor_bytes(adam)
    planned, held, count = mp.muon_state_bytes(muon, whole=False)
    assert planned == state_tensor_bytes(muon) and held == count == len(tg.param_groups(model)["matrices"])


def test_muon_state_sharded_over_two_ranks():
    """Each rank's Muon state after a real step at world size 2 (the all-gather shape-true, values its own) equals
    the plan's count and an independent one: rank r keeps fp32 momentum for matrices r, r + 2, ... of each shape."""
    args = smoke_args(SMALL_VOCAB)
    matrices = tg.param_groups(cpu_model(args))["matrices"]
    by_shape = {}
    for i, p in enumerate(matrices):
        by_shape.setdefault(tuple(p.shape), []).append(p.numel())
    totals = []
    for rank in (0, 1):
        model = cpu_model(args)
        adam, muon = tg.build_optimizers(model, args, rank=rank, world_size=2)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with mp.collectives_in_place():
            muon.step()
        expected = sum(4 * n for sizes in by_shape.values() for n in sizes[rank::2])
        planned, held, count = mp.muon_state_bytes(muon, whole=False)
        assert state_tensor_bytes(muon) == planned == expected
        assert count == len(matrices) and held == sum(len(s[rank::2]) for s in by_shape.values())
        totals.append(planned)
    assert totals[0] >= totals[1] and sum(totals) == mp.muon_state_bytes(
        tg.build_optimizers(cpu_model(args), args)[1], whole=True)[0]


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim", [(6, 6, 128, 128), (6, 2, 128, 128), (4, 4, 96, 64)])
def test_attention_stand_in_saves_what_flex_attention_saves(heads, kv_heads, qk_dim, v_dim):
    """Beyond q, k, v the stand-in saves FlexAttention's own outputs, as torch's FlexAttention shapes them (its fake
    implementation: out in the query's layout, fp32 log-sum-exp and row maxima); MHA, GQA, MLA-like head dims."""
    from torch._higher_order_ops.flex_attention import flex_attention_fake_impl
    T = 256
    q = torch.empty(1, T, heads, qk_dim, dtype=torch.bfloat16, device="meta").transpose(1, 2).requires_grad_()
    k = torch.empty(1, T, kv_heads, qk_dim, dtype=torch.bfloat16, device="meta").transpose(1, 2).requires_grad_()
    v = torch.empty(1, T, kv_heads, v_dim, dtype=torch.bfloat16, device="meta").transpose(1, 2).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mp.FlexAttentionStandIn.apply(q, k, v, None, 0.1)
    assert saved[:3] == [q, k, v]
    flex = flex_attention_fake_impl(q, k, v, None, (), 0.1, {})
    layout = lambda ts: [(tuple(t.shape), t.stride(), t.dtype) for t in ts]
    assert layout(saved[3:]) == layout(flex)


@pytest.mark.parametrize("preset", ["smoke", "frontier_smoke"])
def test_meta_measurement_equals_the_cpu_run(preset):
    """What the plan measures on the meta device (saved for backward, the pass's peak, the BlockMasks) is what the
    same forward + backward allocates with real tensors on the CPU, at two lengths (the second twice the first)."""
    args = smoke_args(f"--preset={preset}", SMALL_VOCAB)
    window = tg.window_at(tg.total_steps(args), args)
    real, meta = cpu_model(args), mp.meta_model(args, NO_FP8)
    for seq_len in (128, 256):
        on_cpu = mp.micro_step_memory(real, seq_len, mp.window_tensors(window, "cpu"))
        assert mp.micro_step_memory(meta, seq_len, mp.window_tensors(window, "meta")) == on_cpu
        assert on_cpu.peak > on_cpu.saved > 0 and on_cpu.masks > 0


def test_activations_grow_linearly_in_the_sequence_length():
    """At the default model's full size: saved bytes and the pass's peak are a + b T (so the plan's split search can
    trust them), which also shows no T x T tensor (the CPU path's dense masks and scores) is counted."""
    args = tg.apply_overrides(tg.Hyperparameters(), [])
    model = mp.meta_model(args, mp.GPUS["h100"])
    window = mp.window_tensors(tg.window_at(tg.total_steps(args), args), "meta")
    m1, m2, m4 = (mp.micro_step_memory(model, t, window) for t in (2048, 4096, 8192))
    for field in ("saved", "peak", "logits_at_peak"):
        a, b, c = (getattr(m, field) for m in (m1, m2, m4))
        assert c - b == 2 * (b - a) and b - a > 0, field
    vocab = tg.next_multiple(args.vocab_size, 128)
    assert m1.logits_at_peak % (2048 * vocab * 4) == 0  # whole fp32 (T, vocab) logit copies


def test_block_masks_match_their_formula():
    """n = T / 128 blocks: a BlockMask holds 4 count vectors (n) and 4 index matrices (n x n) of int32, its mask_mod
    the int64 document ids (T) and the int32 window. The default model builds the long and the short mask."""
    args = tg.apply_overrides(tg.Hyperparameters(), [])
    model = mp.meta_model(args, mp.GPUS["h100"])
    T = 49152
    n = T // 128
    got = mp.micro_step_memory(model, T, mp.window_tensors(tg.window_at(0, args), "meta")).masks
    assert got == 2 * (4 * 4 * (n + n * n) + 8 * T + 4)


def plan_report(capsys, *argv):
    code = pf.main(["--plan", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[-1].startswith("plan: "), captured.out + captured.err
    return code, captured.out, json.loads(lines[-1][len("plan: "):])


def check_totals(report):
    state = sum(report[k] for k in ("params", "buffers", "grads", "optimizer_state", "data", "warmup_snapshot"))
    assert report["optimizer_state"] == report["adam_state"] + report["muon_state"]
    assert report["phases"]["optimizer step"] == state + report["optimizer_step"]
    for st in report["stages"]:
        name = next(n for n in report["phases"] if st["name"] in n)
        assert report["phases"][name] == state + st["masks"] + st["peak"]
    assert report["peak"] == max(report["phases"].values()) + report["cuda_context"] + report["nccl"]
    assert report["fits"] == (report["peak"] <= report["usable"])


def test_default_plan_on_eight_h100(capsys):
    code, out, report = plan_report(capsys, "--gpu=h100", "--nproc", "8")
    args = tg.apply_overrides(tg.Hyperparameters(), [])
    with torch.device("meta"):
        params = tg.count_params(tg.build_model(args))
    assert report["param_count"] == params and report["nproc"] == 8 and report["accumulation"] == 1
    assert report["grads"] == report["params"]  # every parameter gets a gradient in its own dtype
    assert report["muon_matrices_held"] == 8 and report["muon_matrices"] == 46  # 46 matrices in groups of 11/12
    assert [st["seq_len"] for st in report["stages"]] == [49152] and report["nccl"] > 0
    check_totals(report)
    assert report["command"] == "torchrun --standalone --nproc_per_node=8 train_gpt.py"
    assert (code == 0) == (report["verdict"] != "does_not_fit")


def test_frontier_plan_peaks_over_its_stages(capsys):
    code, out, report = plan_report(capsys, "--gpu=h200", "--nproc", "8", "--flags=--preset=frontier")
    assert [st["seq_len"] for st in report["stages"]] == [16384, 32768, 49152, 49152]
    saved = [st["saved"] for st in report["stages"]]
    assert saved[0] < saved[1] < saved[2] == saved[3]
    assert "stage 3 (49152 tokens)" in report["peak_phase"] and report["adam_kind"] == "CautiousAdam"
    assert report["fp8_head"] and report["fp8_mlp"] and report["validation"]["head_chunk"] == 49152
    check_totals(report)
    assert "--preset=frontier" in report["command"] and "memory plan: 8 x h200" in out


def test_a_plan_that_does_not_fit_gets_shorter_sequences(capsys, monkeypatch):
    """A 4 GiB GPU and smoke sequences of 32768 tokens (the fp32 logits alone are 6 GiB): the plan cuts every
    sequence into k with k times the micro-batches (tokens per step unchanged), and that plan fits."""
    monkeypatch.setitem(mp.GPUS, "tiny", mp.Gpu("test GPU", 4, (8, 0)))
    flags = ["--preset=smoke", "--seq_len=32768", "--micro_batches=2"]
    code, lines, report = mp.run(flags, "tiny", 1)
    assert not report["fits"] and report["peak"] > report["usable"]
    new = report["fits_eager_with"]
    assert new["seq_len"] * new["micro_batches"] == 32768 * 2 and new["seq_len"] < 32768
    assert report["fits_eager_with_peak"] <= report["usable"]
    assert report["command_fits_eager"].endswith(f"--seq_len={new['seq_len']} --micro_batches={new['micro_batches']}")
    refit = mp.plan_memory(tg.apply_overrides(tg.Hyperparameters(), flags + [f"--{k}={v}" for k, v in new.items()]),
                           mp.GPUS["tiny"], 1)
    assert refit["fits"] and refit["peak"] == report["fits_eager_with_peak"]


def test_unknown_gpu_names_the_valid_ones(capsys):
    assert pf.main(["--plan", "--gpu=v100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preflight: error: --gpu='v100'") and len(err.splitlines()) == 1
    assert all(name in err for name in ("h100", "h200", "a100-40", "a100-80", "l40s", "4090"))
