"""The record's attention lambdas (--attn_lambdas=o, features/output_lambda.py; frontier recipe 3.3, r47): its form
against #21's with the same weights, the inits, the Adam group."""
import pytest
import torch

import train_gpt as tg
from conftest import frontier_args, live_model, smoke_args, tokens_with_docs


def frontier_smoke_args(*flags):
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke", *flags])
    tg.check_config(args, 1)
    return args


def test_record_lambdas_scale_the_output_and_add_the_value_embedding_as_it_is():
    """The record's form with (l0, l1) equals #21's form with (l0, 1) times l1: its value embedding enters with
    coefficient 1 and l1 multiplies the projected output."""
    record = live_model("--attn_lambdas=o", "--ve_gate=true").blocks[0].attn
    r21 = live_model("--ve_gate=true").blocks[0].attn
    assert torch.equal(record.qkv_w, r21.qkv_w)  # same draw: only the lambdas' meaning differs
    with torch.no_grad():
        record.lambdas.copy_(torch.tensor([0.3, 1.7]))
        r21.lambdas.copy_(torch.tensor([0.3, 1.0]))
        record.ve_gate.weight.copy_(r21.ve_gate.weight)
        inputs = tokens_with_docs(256, [0, 90])
        mask = tg.dense_attention_mask(inputs, 2)
        x, ve = tg.norm(torch.randn(1, 256, 128)), torch.randn(1, 256, 128)
        torch.testing.assert_close(record(x, ve, mask), 1.7 * r21(x, ve, mask))
        torch.testing.assert_close(record(x, None, mask), 1.7 * r21(x, None, mask))


def test_record_lambdas_start_at_half_and_one_and_are_adam_scalars():
    args = frontier_smoke_args()
    assert args.attn_lambdas == "o" and frontier_args().attn_lambdas == "o"
    model = tg.build_model(args)
    attns = [b.attn for b in model.blocks if b.attn is not None]
    assert all(torch.equal(a.lambdas, torch.tensor([0.5, 1.0])) for a in attns)
    scalars = {id(p) for p in tg.param_groups(model, args)["scalars"]}
    assert all(id(a.lambdas) in scalars for a in attns)
    default = tg.build_model(smoke_args())
    assert all(torch.equal(b.attn.lambdas, torch.tensor([0.5, 0.5])) for b in default.blocks if b.attn is not None)


def test_attn_lambdas_flag_is_checked():
    with pytest.raises(SystemExit, match="--attn_lambdas='x'; valid values: ve, o"):
        smoke_args("--attn_lambdas=x")
    with pytest.raises(SystemExit, match="MLA"):
        smoke_args("--attn_lambdas=o", "--mla_kv_rank=32")
