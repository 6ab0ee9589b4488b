"""NEFTune (--neftune_alpha, features/neftune.py): the noise's bound and spread, none in eval. Train-only at the model
level, with dropout: tests/features/test_dropout.py."""
import math

import torch

import features.neftune as neftune


def test_neftune_noise_bound():
    noise = neftune.NEFTune(5.0)
    x = torch.zeros(1, 256, 64)
    out = noise(x)
    bound = 5.0 / math.sqrt(256 * 64)
    assert out.abs().max() <= bound and out.abs().max() > 0.9 * bound and out.std() > 0.5 * bound
    assert torch.equal(noise.eval()(x), x)
