"""features/key_offset.py (--key_offset): it shifts exactly the unrotated key dims, on the long-window blocks only.
Its causality, document crossing and KV-cache refusal with the other frontier flags:
tests/core/test_frontier_model.py."""
import torch

import features.key_offset as key_offset_feature
import train_gpt as tg
from conftest import smoke_args


def test_key_offset_shifts_exactly_the_unrotated_dims():
    rotary = tg.Rotary(128, 64)
    shift = key_offset_feature.KeyOffset(rotary)
    dims = shift.shifted.nonzero().flatten().tolist()
    assert dims == list(range(32, 64)) + list(range(96, 128))  # chunk-halves layout: pairs (i, i + 64), i >= 32
    x = torch.randn(1, 7, 2, 128)
    rotated = rotary(x)
    torch.testing.assert_close(rotated[..., dims], x[..., dims])  # frequency zero: rotary leaves them alone
    assert not torch.allclose(rotated[:, 1:, :, :32], x[:, 1:, :, :32])
    k = shift(rotated)
    torch.testing.assert_close(k[:, 1:, :, dims], rotated[:, :-1, :, dims])
    keep = [d for d in range(128) if d not in dims]
    torch.testing.assert_close(k[..., keep], rotated[..., keep])
    torch.testing.assert_close(k[:, 0], rotated[:, 0])


def test_key_offset_sits_on_long_window_layers_only():
    model = tg.build_model(smoke_args("--key_offset=true"))  # window kinds L S S L, block 2 has no attention
    kinds = [type(b.attn.key_offset).__name__ if b.attn is not None else None for b in model.blocks]
    assert model.window_kind == list("LSSL") and kinds == ["KeyOffset", "PassThrough", None, "KeyOffset"]
