"""--kron_mlp: Kronecker-factorized MLP matrices in the model (kernels.KronLinear), parameter count, optimizer
routing, zero-init of c_proj, and the smoke preset training with them."""
import pytest
import torch

import features.kronecker as kron_feature
import features.moe as moe_feature
import train_gpt as tg
from conftest import randomize_zero_matrices, val_losses
from kernels import KronLinear, choose_kron_factors, kron_dense_weight, kron_macs_per_token, kron_param_count


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


# --- --kron_layers: factorize some blocks only ---------------------------------------------------------------------

def test_kron_layers_factorize_only_the_listed_blocks():
    args = kron_args("--kron_layers=1,2", "--kron_rank=2")
    tg.check_config(args, 1)
    model = tg.build_model(args)
    d, h = 128, 512
    kron = 2 * (kron_param_count(*model.blocks[1].mlp.c_fc.factors, 2) + kron_param_count(
        *model.blocks[1].mlp.c_proj.factors, 2))  # both factors per matrix, per rank
    per_block = [tg.count_params(b.mlp) for b in model.blocks]
    assert per_block == [2 * d * h, kron // 2, kron // 2, 2 * d * h]
    assert [isinstance(b.mlp.c_fc, KronLinear) for b in model.blocks] == [False, True, True, False]
    assert [isinstance(b.mlp.c_proj, KronLinear) for b in model.blocks] == [False, True, True, False]
    dense = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
    assert tg.count_params(model) == tg.count_params(dense) - 2 * (2 * d * h) + kron
    every = tg.build_model(kron_args("--kron_rank=2"))  # "" = every block, as before the flag
    assert all(isinstance(b.mlp.c_fc, KronLinear) for b in every.blocks)


@pytest.mark.parametrize("value,message", [("4", "names blocks \\[4\\] outside 0..3"),
                                           ("0,-1", "names blocks \\[-1\\] outside 0..3"),
                                           ("1;2", "expected comma-separated block indices")])
def test_bad_kron_layers_name_the_fix(value, message):
    with pytest.raises(SystemExit, match=message):
        tg.check_config(kron_args(f"--kron_layers={value}"), 1)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--kron_layers=1"])
    assert any("--kron_layers" in w for w in tg.meaningless_flags(args))  # no effect without --kron_mlp


# --- mixture of Kronecker experts (--moe_experts with --kron_mlp=both) ---------------------------------------------

def loop_over_experts(layer, x, offsets):
    """Each expert's segment of rows times its dense W_e = sum_i A_ei (x) B_ei."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ kron_dense_weight(layer.A[e], layer.B[e]).T)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("factors", [(8, 16, 16, 8), (16, 8, 8, 16)])
def test_grouped_kron_linear_equals_a_loop_over_experts(factors):
    """Both contraction orders, rank 2, an empty expert segment; forward and every gradient."""
    torch.manual_seed(0)
    m1, k1, m2, k2 = factors
    layer = kron_feature.GroupedKronLinear(4, k1 * k2, m1 * m2, rank=2, factors=factors)
    assert layer.A.shape == (4, 2, m1, k1) and layer.B.shape == (4, 2, m2, k2)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(20, k1 * k2, requires_grad=True)
    y = layer(x, offsets)
    ref = loop_over_experts(layer, x, offsets)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), (x, layer.A, layer.B))
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, layer.A, layer.B))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert kron_feature.kron_contracts_k1_first(*factors) == (factors == (8, 16, 16, 8))  # the two orders
    assert layer.macs_per_token() == kron_macs_per_token(*factors, 2)


@pytest.mark.parametrize("factors", [(8, 16, 16, 16), (16, 8, 8, 16), (8, 16, 16, 12), (12, 16, 16, 8)])
def test_grouped_mm_stride_rule_is_what_torch_checks(factors):
    """check_config's rule (grouped_kron_strides all multiples of 8) is exactly when the compiled forward and backward
    pass torch._grouped_mm's stride checks (its meta function enforces the GPU's 16-byte rule on any device)."""
    m1, k1, m2, k2 = factors
    layer = kron_feature.GroupedKronLinear(4, k1 * k2, m1 * m2, 1, factors).bfloat16()
    x = torch.randn(512, k1 * k2, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([100, 100, 300, 512], dtype=torch.int32)
    torch._dynamo.reset()
    aligned = all(v % 8 == 0 for v in kron_feature.grouped_kron_strides(factors, 1).values())
    try:
        torch.compile(layer, fullgraph=True, dynamic=False)(x, offsets).float().sum().backward()
        compiled = True
    except Exception as e:
        assert "multiple of 16 bytes" in str(e)
        compiled = False
    assert compiled == aligned == (factors[3] != 12 and factors[0] != 12)


KRON_MOE = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1", "--moe_hidden=256", "--kron_mlp=both"]


def test_kron_experts_equal_a_token_by_token_loop():
    torch.manual_seed(0)
    args = kron_args(*KRON_MOE, "--kron_rank=2")
    tg.check_config(args, 1)
    moe = tg.build_mlp(args)
    assert type(moe) is kron_feature.KronMoE and not hasattr(moe, "fc_w")
    k1_first = kron_feature.kron_contracts_k1_first
    assert k1_first(*moe.c_proj.factors) != k1_first(*moe.c_fc.factors)
    assert moe.c_proj.B.abs().sum() == 0 and moe.c_proj.A.abs().sum() > 0  # zero-init like KronLinear's c_proj
    with torch.no_grad():
        moe.c_proj.B.normal_(0, 0.2)
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(40, 128)
    y = moe(x)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    w_fc = [kron_dense_weight(a, b) for a, b in zip(moe.c_fc.A, moe.c_fc.B)]
    w_proj = [kron_dense_weight(a, b) for a, b in zip(moe.c_proj.A, moe.c_proj.B)]
    ref = torch.zeros_like(x)
    for n in range(len(x)):
        top = torch.topk(probs[n], 2).indices.tolist()
        for e, g in [(e, probs[n, e]) for e in top] + [(4, 1.0)]:
            ref[n] += g * (w_proj[e] @ torch.relu(w_fc[e] @ x[n]).square())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    (y * ref.detach()).sum().backward()  # gradients reach every expert's factors and the router
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.parameters())


def test_kron_experts_in_the_model_count_route_and_stay_causal():
    args = kron_args(*KRON_MOE)
    tg.check_config(args, 1)
    torch.manual_seed(0)
    model = tg.build_model(args)
    moe = model.blocks[0].mlp
    assert moe_feature.moe_layers(model) == [b.mlp for b in model.blocks] and isinstance(moe, kron_feature.KronMoE)
    fc, proj = choose_kron_factors(128, 256), choose_kron_factors(256, 128)
    assert moe.c_fc.factors == fc and moe.c_proj.factors == proj
    per_block = 4 * 128 + 5 * (kron_param_count(*fc) + kron_param_count(*proj))  # router + 5 experts
    dense = tg.build_model(tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke"]))
    assert tg.count_params(model) == tg.count_params(dense) + 4 * (per_block - 2 * 128 * 512)
    assert moe.flops_per_token() == 2 * 4 * 128 + 2 * 3 * (kron_macs_per_token(*fc) + kron_macs_per_token(*proj))
    assert "mlp KronMoE x4, 4 experts top-2 + 1 shared of width 256" in tg.describe_model(model, args)
    adam, muon = tg.build_optimizers(model, args)  # --kron_optimizer=adam: the expert factors too
    factors = {id(p) for b in model.blocks for m in (b.mlp.c_fc, b.mlp.c_proj) for p in (m.A, m.B)}
    assert factors == {id(p) for p in adam.param_groups[-1]["params"]}
    assert not factors & {id(p) for g in muon.param_groups for p in g["params"]}
    randomize_zero_matrices(model).eval()
    x = torch.randint(0, 50000, (256,), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[200:] = torch.randint(0, 50000, (56,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:200], b[:200])
    assert not torch.allclose(a[200:], b[200:])


def test_kron_factors_flag_sizes_the_experts():
    args = kron_args(*KRON_MOE, "--kron_factors=16,8,16,16;8,16,16,16")  # 128 -> 256 and 256 -> 128
    tg.check_config(args, 1)
    moe = tg.build_mlp(args)
    assert moe.c_fc.factors == (16, 8, 16, 16) and moe.c_proj.factors == (8, 16, 16, 16)
    with pytest.raises(SystemExit, match="need m1\\*m2=256"):  # the expert width, not mlp_ratio * model_dim
        tg.check_config(kron_args(*KRON_MOE, "--kron_factors=16,8,32,16;8,16,16,32"), 1)


@pytest.mark.slow
def test_compiled_kron_experts_equal_eager():
    """One graph for routing + both grouped Kronecker matrices, forward and backward, in the GPU's bf16."""
    torch.manual_seed(0)
    moe = randomize_zero_matrices(tg.build_mlp(kron_args(*KRON_MOE, "--kron_rank=2"))).bfloat16()
    x = torch.randn(512, 128, dtype=torch.bfloat16)
    ref = moe(x)
    torch._dynamo.reset()
    out = torch.compile(moe, fullgraph=True, dynamic=False)(x)
    assert (out.float() - ref.float()).abs().max() < 0.01  # measured 0.0005
    out.float().sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


@pytest.mark.slow
def test_smoke_trains_with_kron_experts(shakespeare_shards, tmp_path, capsys):
    train, val = shakespeare_shards
    code = tg.main(["--preset=smoke", *KRON_MOE, "--kron_layers=0,3", f"--train_files={train}",
                    f"--val_files={val}", f"--records_dir={tmp_path}", "--num_iterations=8", "--val_every=4",
                    "--micro_batches=1", "--val_tokens=2048"])
    out = capsys.readouterr().out
    vals = val_losses(out)
    assert code == 0 and "mlp KronMoE, MoE x4" in out and "moe_load_min_max:" in out
    assert vals[-1] < vals[0] - 2.5, vals
