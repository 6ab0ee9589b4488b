"""features/moe.py (--moe_experts): routing to exactly top-k plus the shared experts, equality with a slow
per-expert loop, the aux loss and the aux-loss-free biases, the 3-D Muon batches and the utilization log. Its
shapes, causality and parameter count with every other flag: tests/core/test_arch_flags.py."""
import pytest
import torch
import torch.nn.functional as F

import features.moe as moe_feature
import train_gpt as tg
from conftest import smoke_args, smoke_model, tokens_with_docs

V, VP, D, H, HD, L, HIDDEN = 50257, 50304, 128, 2, 64, 4, 512  # the smoke preset; block 2 has no attention

MOE = ["--moe_experts=4", "--moe_topk=2", "--moe_shared=1"]
MOE_SWIGLU = [*MOE, "--mlp_act=swiglu"]


def small_moe(*extra, seed=0):
    torch.manual_seed(seed)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--model_dim=32", "--moe_experts=4",
                                                     "--moe_topk=2", "--moe_shared=1", "--moe_hidden=16", *extra])
    tg.check_config(args, 1)
    moe = moe_feature.MoE(args)
    with torch.no_grad():
        moe.proj_w.normal_(0, 0.2)
        moe.router.weight.normal_(0, 0.5)
    return moe


def relu2_expert(moe, e, x):
    return moe.proj_w[e] @ F.relu(moe.fc_w[e] @ x).square()


def swiglu_expert(moe, e, x):
    gate, up = (moe.fc_w[e] @ x).chunk(2)  # fc_w rows: [gate | up]
    return moe.proj_w[e] @ (F.silu(gate) * up)


def reference_moe(moe, x, expert=relu2_expert):
    """Token by token, expert by expert."""
    probs = F.softmax(x @ moe.router.weight.T, -1)
    out = torch.zeros_like(x)
    for n in range(len(x)):
        top = torch.topk(probs[n] + moe.bias, moe.topk).indices.tolist()
        for e, g in [(e, probs[n, e]) for e in top] + [(moe.num_experts + s, 1.0) for s in range(moe.num_shared)]:
            out[n] += g * expert(moe, e, x[n])
    return out


def test_moe_routes_each_token_to_exactly_topk_experts_plus_the_shared():
    moe = small_moe()
    x = torch.randn(64, 32)
    experts, gates, probs = moe.route(x)
    assert experts.shape == gates.shape == (64, 3)
    top = experts[:, :2]
    assert (top < 4).all() and (top[:, 0] != top[:, 1]).all() and (experts[:, 2] == 4).all()
    assert torch.equal(top.sort(-1).values, torch.topk(probs, 2).indices.sort(-1).values)
    torch.testing.assert_close(gates[:, :2], probs.gather(-1, top))
    assert (gates[:, 2] == 1).all()
    moe.eval()
    moe(x)
    assert moe.eval_load.sum() == 64 * 2 and moe.load.sum() == 0  # routed pairs add up to tokens * topk
    moe.train()
    moe(x)
    assert torch.equal(moe.load, moe.eval_load)


@pytest.mark.parametrize("act,expert", [("relu2", relu2_expert), ("swiglu", swiglu_expert)], ids=["relu2", "swiglu"])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_equals_the_slow_reference_loop(skew, act, expert):
    moe = small_moe(f"--mlp_act={act}")
    assert moe.fc_w.shape == (5, 16 * (2 if act == "swiglu" else 1), 32)
    if skew:  # every token prefers expert 3: dropless means nothing is lost however unbalanced
        with torch.no_grad():
            moe.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.randn(2, 24, 32)
    y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.view(48, 32), reference_moe(moe, x.view(48, 32), expert), rtol=1e-5, atol=1e-5)
    if skew:
        assert moe.load[3] == 48
    w = torch.randn_like(y)
    (y * w).sum().backward()  # gradients through the grouped matmuls equal the loop's
    grads = [p.grad.clone() for p in (moe.fc_w, moe.proj_w, moe.router.weight)]
    moe.zero_grad()
    (reference_moe(moe, x.view(48, 32), expert) * w.view(48, 32)).sum().backward()
    for g, p in zip(grads, (moe.fc_w, moe.proj_w, moe.router.weight)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_moe_aux_loss_is_its_minimum_at_uniform_routing():
    moe = small_moe("--moe_aux_coef=0.01")
    x = torch.randn(64, 32)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probs: the loss is coef * E * sum_e f_e / E = coef for any loads
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01))
    probs = torch.full((64, 4), 0.25)
    moe.observe(torch.full((4,), 32.0), probs)  # uniform loads and probs
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01))
    skewed = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(64, 4)
    moe.observe(torch.tensor([64.0, 32.0, 16.0, 16.0]), skewed)  # loads follow the skewed probs
    assert moe.aux_loss > 0.01 * 1.5
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    moe(x)
    assert moe.aux_loss > 0.01
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0  # the aux loss trains the router
    assert small_moe("--moe_balance=bias").aux_coef == 0.0


def test_moe_aux_loss_is_added_in_training_only():
    model = smoke_model(*MOE)
    x = tokens_with_docs(256, [0, 100])
    loss = model(x[:-128], x[1:-127])
    ce = F.cross_entropy(model(x[:-128]), x[1:-127])  # this forward leaves the aux losses in place
    aux = sum(m.aux_loss for m in moe_feature.moe_layers(model))
    assert 0.03 < aux.item() < 0.06  # 4 layers, about coef each near uniform routing
    torch.testing.assert_close(loss, ce + aux)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:-128], x[1:-127]), ce.detach(), rtol=1e-5, atol=1e-5)


def test_moe_bias_moves_toward_under_used_experts():
    moe = small_moe("--moe_balance=bias", "--moe_bias_rate=0.1")
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(moe.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # repeated updates from the observed loads spread a router that favors expert 0 over the experts
    moe = small_moe("--moe_balance=bias", "--moe_bias_rate=0.02")
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1
    loads = []
    for _ in range(40):
        moe.load.zero_()
        moe(x)
        loads.append(moe.load.clone())
        moe.update_bias(moe.load)
    spread = lambda load: (load.max() - load.min()).item()
    late = torch.stack(loads[-10:]).mean(0)  # constant-size sign steps end in an oscillation around balance
    assert spread(late) < 0.3 * spread(loads[0]), (loads[0], late)
    assert moe.bias[0] < 0 < moe.bias[1:].min()


def test_moe_bias_updates_once_per_optimizer_step_from_the_loads():
    for balance, moves in (("bias", True), ("aux", False)):
        args = smoke_args(*MOE, f"--moe_balance={balance}", "--moe_bias_rate=0.01")
        torch.manual_seed(0)
        model = tg.build_model(args)
        optimizers = tg.build_optimizers(model, args)
        x = tokens_with_docs(256, [0, 100])
        for _ in range(2):  # two micro-batches accumulate into one step's load
            model(x[:-128], x[1:-127]).backward()
        loads = [m.load.clone() for m in moe_feature.moe_layers(model)]
        assert all(load.sum() == 2 * 128 * 2 for load in loads)
        for opt in optimizers:
            opt.step()
        for moe, load in zip(moe_feature.moe_layers(model), loads):
            expected = 0.01 * torch.sign(load.mean() - load) if moves else torch.zeros(4)
            torch.testing.assert_close(moe.bias, expected)
            assert moe.load.sum() == 0


def test_moe_weights_are_3d_muon_batches_and_utilization_is_logged():
    model = smoke_model(*MOE)
    args = smoke_args(*MOE)
    adam, muon = tg.build_optimizers(model, args)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    moe = moe_feature.moe_layers(model)[0]
    assert moe.fc_w.shape == (5, 192, D) and moe.proj_w.shape == (5, D, 192)
    assert {id(moe.fc_w), id(moe.proj_w), id(moe.router.weight)} <= muon_ids
    assert moe_feature.moe_utilization(tg.build_model(smoke_args())) == ""
    model.eval()
    with torch.no_grad():
        model(tokens_with_docs(256, [0, 100]))
    text = moe_feature.moe_utilization(model)
    assert text.startswith(" moe_load_min_max:") and len(text.split(":")[1].split(",")) == L
    assert all(m.eval_load.sum() == 0 for m in moe_feature.moe_layers(model))  # reset for the next validation
    assert moe.flops_per_token() == 2 * 4 * D + 2 * 3 * 2 * 192 * D


def test_swiglu_experts_take_two_thirds_of_the_width():
    """Default width: 2/3 of the relu2 experts' (rounded to 64), c_fc twice as wide, so parameters and active FLOPs
    stay near the dense MLP's; FLOPs count fc and proj separately."""
    args = tg.apply_overrides(tg.Hyperparameters(), [*MOE_SWIGLU, "--moe_experts=8"])
    tg.check_config(args, 1)
    assert moe_feature.moe_expert_hidden(args) == 704  # 2/3 * 3072 / 3 = 682.7 -> 704 (relu2 experts: 1024)
    moe = small_moe("--mlp_act=swiglu")
    assert isinstance(moe.act, tg.GatedSiLU) and moe.proj_w.shape == (5, 32, 16)
    assert moe.flops_per_token() == 2 * 4 * 32 + 2 * 3 * (32 * 32 + 32 * 16)
    x = torch.randn(10, 32)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(tg.GatedSiLU()(x), F.silu(gate) * up)
