"""features/mtp.py (--mtp_weights, --prefix_weights; frontier recipe 3.7): the stage weight table, flag errors,
the prefix-token table, the weighted losses against a loop of cross-entropies, causality with validation on the
next token only, and the schedule that writes the step's weights in place."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import features.mtp as mtp_feature
import train_gpt as tg
from conftest import frontier_args as frontier, randomize_zero_matrices, smoke_args


def objective_model(*flags, seed=0):
    torch.manual_seed(seed)
    return randomize_zero_matrices(tg.build_model(smoke_args(*flags)))


MTP = ["--vocab_size=1024", "--mtp_weights=1,0.5,0.25", "--prefix_weights=0.25"]


# ---------------------------------------------------------------------------------------------------------------
# Loss weights per stage (recipe section 1.2's table)


def test_stage_loss_weights_are_the_recipe_table():
    args = frontier()
    w = lambda step: [round(v, 4) for v in mtp_feature.loss_weights(step, args)]  # [next, +1, +2, prefix]
    assert w(0) == [1.0, 0.5, 0.25, 0.25]
    assert w(211) == [1.0, 0.5, round(0.25 * (1 - 211 / 423), 4), 0.25]  # 0.25 -> 0 over stage 1 (steps 0-422)
    assert w(423) == [1.0, 0.5, 0.0, 0.25]  # stage 2: [1, 0.5 -> 0], prefix 0.25 -> 0
    assert w(635) == [1.0, round(0.5 * (1 - 212 / 424), 4), 0.0, round(0.25 * (1 - 212 / 424), 4)]
    assert w(847) == w(1269) == w(1270) == w(1284) == [1.0, 0.0, 0.0, 0.0]  # stage 3 and the extension: [1]
    assert mtp_feature.loss_weights(5, tg.Hyperparameters()) == [1.0]  # the default: next token alone


def test_stage_weights_parse_into_term_weights():
    term = mtp_feature.TermWeight
    assert mtp_feature.parse_stage_weights("1,0.5,0.25-0;1,0.5-0;1") == (
        (term(1.0, 1.0), term(0.5, 0.5), term(0.25, 0.0)), (term(1.0, 1.0), term(0.5, 0.0)), (term(1.0, 1.0),))
    assert mtp_feature.parse_stage_weights(" 0.1-0.35 ") == ((term(0.1, 0.35),),)
    assert term(0.25, 0.0).at(0.0) == 0.25 and term(0.25, 0.0).at(0.5) == 0.125 and term(0.25, 0.0).at(1.0) == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        term(1.0, 1.0).start = 2.0
    for text in ("1,x", "1-2-3", "-1", "1,inf", "nan", "1;", "1,,0.5", ""):
        with pytest.raises(ValueError):
            mtp_feature.parse_stage_weights(text)


def test_loss_weights_are_bit_for_bit_the_pinned_floats():
    """Exact floats (no rounding) of a + (b - a) * frac: the recipe's three stages, and a one-stage run whose ranges
    go up from nonzero starts (a * (1 - frac) + b * frac, say, would differ in the last bit at steps 13 and 29)."""
    args = frontier()
    assert mtp_feature.loss_weights(1, args) == [1.0, 0.5, 0.24940898345153664, 0.25]
    assert mtp_feature.loss_weights(422, args) == [1.0, 0.5, 0.0005910165484633578, 0.25]
    assert mtp_feature.loss_weights(846, args) == [1.0, 0.0011792452830188815, 0.0, 0.0005896226415094408]
    rising = smoke_args("--mtp_weights=1,0.3-0.7", "--prefix_weights=0.1-0.35")  # one 30-step stage
    assert mtp_feature.loss_weights(7, rising) == [1.0, 0.3933333333333333, 0.15833333333333333]
    assert mtp_feature.loss_weights(13, rising) == [1.0, 0.4733333333333333, 0.20833333333333331]
    assert mtp_feature.loss_weights(29, rising) == [1.0, 0.6866666666666666, 0.3416666666666667]
    assert mtp_feature.loss_weights(30, rising) == [1.0, 0.7, 0.35]


@pytest.mark.parametrize("flags,message", [
    (["--mtp_weights=1,0.5;1"], "has 2 ';'-separated entries; the run has 3 stages"),
    (["--prefix_weights=0.25,0.1;0;0"], "one weight per stage"),
    (["--mtp_weights=1,x;1;1"], "plain non-negative numbers"),
    (["--untie_step=846"], "must be a step at which Adam updates .* e.g. 845 or 847"),
    (["--untie_step=847", "--head_init_std=0"], "needs --head_init_std > 0"),
])
def test_bad_objective_flags_name_the_fix(flags, message):
    with pytest.raises(SystemExit, match=message):
        frontier(*flags)


def test_prefix_token_table_by_hand():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("GPT-2 BPE files unavailable (set TIKTOKEN_CACHE_DIR)")
    table = mtp_feature.prefix_token_table(50304)
    token = lambda text: enc.encode_single_token(text)
    assert table[token("hello")] == token("hell") and table[token(" t")] == token(" ")
    assert table[token("!")] == -1 and table[tg.EOT_TOKEN] == -1 and table[50300] == -1  # a byte; EOT; padding
    assert int((table >= 0).sum()) == 50_000
    vocab = {enc.decode_single_token_bytes(t) for t in range(enc.n_vocab)}
    for t in range(1000, 1200):  # each prefix is proper, and no longer proper prefix is a token
        piece, p = enc.decode_single_token_bytes(t), int(table[t])
        longest = max((n for n in range(1, len(piece)) if piece[:n] in vocab), default=0)
        assert (p == -1) == (longest == 0)
        if p >= 0:
            assert enc.decode_single_token_bytes(p) == piece[:longest]


def test_weighted_losses_equal_a_loop_of_cross_entropies(monkeypatch):
    T, V = 12, 40
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, V, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (T,), generator=gen)
    prefix = torch.randint(-1, V, (V,), generator=gen)
    monkeypatch.setattr(mtp_feature, "prefix_token_table", lambda vocab_size: prefix)
    loss = mtp_feature.WeightedTokenLosses(num_targets=3, prefix=True, vocab_size=V)
    loss.weights.copy_(torch.tensor([1.0, 0.5, 0.25, 0.3]))
    ce = lambda rows, cols: F.cross_entropy(logits[rows], cols, reduction="sum")
    ref = ce(slice(0, T), targets) + 0.5 * ce(slice(0, T - 1), targets[1:]) + 0.25 * ce(slice(0, T - 2), targets[2:])
    has = prefix[targets] >= 0  # positions whose next token has a prefix token
    ref = (ref + 0.3 * ce(has, prefix[targets][has])) / T
    out = loss(logits, targets)
    torch.testing.assert_close(out, ref)
    g, g_ref = torch.autograd.grad(out, logits)[0], torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g, g_ref)
    loss.weights.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # stage 3: the next token alone = #21's loss
    torch.testing.assert_close(loss(logits, targets), F.cross_entropy(logits, targets))


def test_mtp_model_is_causal_and_validates_on_the_next_token_only():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("GPT-2 BPE files unavailable (set TIKTOKEN_CACHE_DIR)")
    model, plain = objective_model(*MTP), objective_model("--vocab_size=1024")
    plain.load_state_dict(model.state_dict())  # the same weights: MTP and prefix add no parameters
    assert tg.count_params(model) == tg.count_params(plain)
    x = torch.randint(0, 1024, (257,), generator=torch.Generator().manual_seed(1))
    inputs, targets = x[:-1], x[1:]
    with torch.no_grad():
        a = model(inputs)
        changed = inputs.clone()
        changed[200:] = 7
        b = model(changed)
    assert torch.equal(a[:200], b[:200]) and not torch.equal(a[200:], b[200:])  # the head reads the past only
    model.eval(), plain.eval()
    with torch.no_grad():
        assert model(inputs, targets) == plain(inputs, targets)  # validation: next-token CE, no extra terms
    model.train(), plain.train()
    mtp_feature.LossSchedule(model, smoke_args(*MTP), torch.device("cpu")).set(0)
    with torch.no_grad():
        assert model(inputs, targets) > plain(inputs, targets)  # training adds the weighted MTP/prefix terms


def test_loss_schedule_writes_the_step_weights_in_place():
    args = smoke_args("--mtp_weights=1,0.5-0")
    model = tg.build_model(args)
    buffer = model.train_loss.weights
    schedule = mtp_feature.LossSchedule(model, args, torch.device("cpu"))
    schedule.set(15)
    assert model.train_loss.weights is buffer and buffer.tolist() == [1.0, 0.25]  # half-way through 30 steps
    schedule.set(29)  # the last step of the run (the table ends there)
    assert buffer[1].item() == pytest.approx(0.5 / 30)
    assert mtp_feature.LossSchedule(tg.build_model(smoke_args()), smoke_args(), torch.device("cpu")).buffer is None
