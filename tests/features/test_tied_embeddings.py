"""Tied embeddings (--tie_embeddings, features/tied_embeddings.py): one table, owned by Adam's embedding group, read by
the head at unit-std initial logits; the padding rows learn from the head alone; one tensor in the state dict."""
import torch
import torch.nn.functional as F

import features.tied_embeddings as tied_embeddings
import train_gpt as tg
from conftest import smoke_args, smoke_model, tokens_with_docs

VP, D = 50304, 128  # the smoke preset's padded vocabulary and width


def test_tied_head_shares_the_embedding_owned_by_adam_embeds():
    args = smoke_args("--tie_embeddings=true")
    model = smoke_model("--tie_embeddings=true")
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.shape == (VP, D)
    assert isinstance(model.lm_head, tied_embeddings.TiedHead) and not list(model.lm_head.parameters(recurse=False))[1:]
    groups = tg.param_groups(model, args)
    assert groups["head"] == [] and sum(p is model.embed.weight for g in groups.values() for p in g) == 1
    adam, muon = tg.build_optimizers(model, args)
    owner = [g for g in adam.param_groups if any(p is model.embed.weight for p in g["params"])]
    assert len(owner) == 1 and owner[0]["lr"] == args.embed_lr
    x = tokens_with_docs(256, [0, 100])
    with torch.no_grad():
        raw = model.lm_head(F.rms_norm(torch.randn(256, D), (D,)))
    assert 0.8 < raw.std() < 1.2  # x @ E^T / sqrt(dim) with E ~ N(0, 1): unit-std initial logits
    model(x[:-128], x[1:-127]).backward()
    rows = model.embed.weight.grad.abs().sum(-1)
    assert (rows[50257:] > 0).all()  # padding rows: head gradient only
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr()
