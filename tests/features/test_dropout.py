"""Dropout (--dropout, features/dropout.py): installed in every kind of block; it and NEFTune act in training only
(eval equals the model without them)."""
import pytest
import torch

from conftest import smoke_model, tokens_with_docs


@pytest.mark.parametrize("flag", ["--neftune_alpha=5", "--dropout=0.1"])
def test_noise_is_train_only(flag):
    model = smoke_model(flag)
    reference = smoke_model()  # same seed, same weights, flag off
    x = tokens_with_docs(256, [0, 100])
    model.eval()
    reference.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    model.train()
    a, b = model(x[:-128], x[1:-127]), model(x[:-128], x[1:-127])
    assert a.item() != b.item()


@pytest.mark.parametrize("flags", [[], ["--sublayer_lambdas=true"], ["--mudd_block=3", "--mudd_block_source=2"]],
                         ids=["Block", "SublayerBlock", "MuddBlock"])
def test_dropout_sits_in_every_kind_of_block(flags):
    """Each kind of block (the core's, a feature's) leaves its dropout socket an Identity; --dropout fills them all."""
    assert all(type(b.dropout) is torch.nn.Identity for b in smoke_model(*flags).blocks)
    blocks = smoke_model(*flags, "--dropout=0.1").blocks
    assert all(isinstance(b.dropout, torch.nn.Dropout) and b.dropout.p == 0.1 for b in blocks)
