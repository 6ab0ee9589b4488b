"""features/learned_gelu.py (--mlp_act=learned_gelu): it starts as the plain GELU, builds in every block's MLP, and
its per-channel scale and shift train with the Adam scalars."""
import torch
import torch.nn.functional as F

import features.learned_gelu as learned_gelu_feature
import train_gpt as tg
from conftest import smoke_args, smoke_model

HIDDEN, L = 512, 4  # the smoke preset's MLP width and depth


def test_learned_gelu_starts_as_gelu_and_its_affine_is_adam_scalars():
    act = learned_gelu_feature.LearnedGELU(16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(act(x), F.gelu(x))
    mlp = tg.build_mlp(smoke_args("--mlp_act=learned_gelu"))
    assert type(mlp.act) is learned_gelu_feature.LearnedGELU and mlp.act.scale.shape == (HIDDEN,)
    groups = tg.param_groups(smoke_model("--mlp_act=learned_gelu"))
    assert sum(p.shape == (HIDDEN,) for p in groups["scalars"]) == 2 * L
