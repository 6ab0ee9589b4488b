"""YaRN (--yarn, features/yarn.py; frontier recipe 1.4): the rotary frequencies and the scale gain after window
changes, by hand. Its updates reaching a compiled graph across stages: tests/core/test_frontier.py."""
import math

import pytest
import torch

import features.yarn as yarn_feature
import train_gpt as tg


def test_yarn_scales_and_frequencies():
    rotary = yarn_feature.YarnRotary(128, 64)
    base = rotary.frequencies()
    assert base[5] == pytest.approx(1024 ** (-5 / 31)) and base[32:].abs().sum() == 0  # dims 64-127 unrotated
    windows = [3 * 128, 7 * 128, 11 * 128, 13 * 128]
    scales = []
    for n in range(2, 5):
        rotary.set_windows(windows[:n])
        scales.append(0.1 * rotary.gain.item() ** 2)
    assert scales == pytest.approx([0.11695, 0.12752, 0.13178], abs=5e-6)
    rotary.set_windows(windows[:2])  # 384 -> 896 tokens, by hand for a fast, a slow and an in-between frequency
    ratio = 384 / 896
    for k, keep in ((0, 1.0), (31, 0.0), (5, (384 * 1024 ** (-5 / 31) / (2 * math.pi) - 1) / 31)):
        assert 0 <= keep <= 1
        expected = 1024 ** (-k / 31) * (ratio + keep * (1 - ratio))
        assert rotary.cos[1, k].item() == pytest.approx(math.cos(expected), abs=1e-6), k
        assert rotary.sin[3, k].item() == pytest.approx(math.sin(3 * expected), abs=1e-6), k
    rotary.set_windows(windows[:1])  # one window: plain rotary again
    x = torch.randn(1, 64, 2, 128)
    assert torch.equal(rotary(x), tg.Rotary(128, 64)(x))
