"""Skip gate (--skip_gate, features/skip_gate.py; frontier recipe 3.3, r32/r45), with the x-lambda init: the init
values, and a skip's contribution scaled by sigmoid(w)."""
import pytest
import torch

import features.skip_gate as skip_gate_feature
import train_gpt as tg
from conftest import randomize_zero_matrices, smoke_args, tokens_with_docs


def test_resid_lambda_init_and_sigmoid_skip_weights():
    model = tg.build_model(smoke_args("--resid_lambda_init=1.1", "--skip_gate=true"))
    assert all(b.lambdas.tolist() == pytest.approx([1.1, 0.0]) for b in model.blocks)
    assert model.skip_weights.tolist() == [-1.5, -1.5]
    assert isinstance(model.skip_gate, skip_gate_feature.SigmoidSkipWeights)
    randomize_zero_matrices(model)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out0", o.detach()))
    model.blocks[3].register_forward_pre_hook(lambda m, i: seen.setdefault("in3", []).append(i[0].detach()))
    x = tokens_with_docs(256, [0])
    with torch.no_grad():
        model.skip_weights[-1] = -30.0  # sigmoid ~ 0: no skip
        model(x)
        model.skip_weights[-1] = 0.4
        model(x)
    torch.testing.assert_close(seen["in3"][1] - seen["in3"][0], torch.sigmoid(torch.tensor(0.4)) * seen["out0"],
                               rtol=1e-4, atol=1e-4)
