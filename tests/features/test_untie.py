"""Frontier II (issue 14), the head of the post-#21 recipe (../shared/docs/frontier_recipe.md section 3.2): the
embedding tied to the head until --untie_step, then the head's Adam state copied to it. Resume across the untie and
1 vs 2 processes: tests/core/test_frontier.py; the recipe's losses (3.7): tests/features/test_mtp.py."""
import copy

import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import randomize_zero_matrices, smoke_args


# ---------------------------------------------------------------------------------------------------------------
# Tied until --untie_step, then untied with the head's Adam state


# a 1,024-token vocabulary keeps the head small: these tests step the optimizers on CPU
UNTIE = ["--vocab_size=1024", "--head_init_std=0.005", "--untie_step=3", "--adam_every=2", "--adam_wd=0.005",
         "--embed_lr=0.008"]


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[(x[:-1], x[1:]) for x in [torch.randint(0, 1024, (513,), generator=gen)]] for _ in range(n)]


def test_tied_embedding_follows_the_head_then_gets_its_adam_state():
    args = smoke_args(*UNTIE)
    torch.manual_seed(0)
    model = tg.build_model(args)
    head, embed = model.lm_head.weight, model.embed.weight
    assert torch.equal(embed, head[:args.vocab_size]) and 0.004 < head.std().item() < 0.006
    adam, muon = opts = tg.build_optimizers(model, args)
    data = batches(6)
    for step in range(4):  # Adam updates at steps 1 and 3 (adam_every=2); the untie follows step 3's update
        tg.train_step(model, opts, data[step], 1, args, step, 1)
        assert torch.equal(embed, head[:args.vocab_size]), step
        assert embed not in adam.state or step == 3
    state, head_state = adam.state[embed], adam.state[head]
    assert state["step"] == head_state["step"] == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], head_state[key][:args.vocab_size])
        assert state[key] is not head_state[key]
    before = embed.detach().clone()
    for step in (4, 5):
        tg.train_step(model, opts, data[step], 1, args, step, 1)
    assert not torch.equal(embed, before) and not torch.equal(embed, head[:args.vocab_size])  # its own updates
    assert adam.state[embed]["step"] == 3


def test_tied_update_equals_a_head_that_serves_as_the_embedding():
    """While tied, the head's Adam update sees its own gradient plus the embedding's: the same as a model whose
    embedding lookups read the head's weight directly (autograd adds the two uses)."""
    flags = ["--vocab_size=1024", "--head_init_std=0.005", "--adam_wd=0.005", "--embed_lr=0.008"]
    args = smoke_args(*flags, "--untie_step=2")
    torch.manual_seed(0)
    model = randomize_zero_matrices(tg.build_model(args))
    shared = copy.deepcopy(model)
    shared.embed.forward = lambda ids: F.embedding(ids, shared.lm_head.weight[:args.vocab_size])
    opts, ref_opts = tg.build_optimizers(model, args), tg.build_optimizers(shared, smoke_args(*flags))
    head_before = model.lm_head.weight.detach().clone()
    data = batches(1)[0]
    tg.train_step(model, opts, data, 1, args, 0, 1)
    tg.train_step(shared, ref_opts, data, 1, args, 0, 1)
    assert shared.embed.weight.grad is None  # the reference's embedding table is never read
    assert torch.equal(model.lm_head.weight, shared.lm_head.weight) and not torch.equal(head_before,
                                                                                         shared.lm_head.weight)
    assert torch.equal(model.embed.weight, shared.lm_head.weight[:args.vocab_size])


def test_untie_survives_the_optimizer_reload_of_the_compile_warmup():
    """compile_warmup restores the optimizers with load_state_dict: the tie's count of Adam updates is re-read."""
    args = smoke_args(*UNTIE)
    torch.manual_seed(0)
    model = tg.build_model(args)
    adam, _ = opts = tg.build_optimizers(model, args)
    fresh = copy.deepcopy(adam.state_dict())
    for step, data in enumerate(batches(4)):
        tg.train_step(model, opts, data, 1, args, step, 1)
    adam.load_state_dict(fresh)
    model.embed.weight.data.copy_(model.lm_head.weight.data[:args.vocab_size])
    for step, data in enumerate(batches(2, seed=1)):
        tg.train_step(model, opts, data, 1, args, step, 1)
        assert torch.equal(model.embed.weight, model.lm_head.weight[:args.vocab_size])  # tied again from 0
