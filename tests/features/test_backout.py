"""Backout (--backout_layer, features/backout.py; frontier recipe 3.3, r40), with a listed skip: the model against
the blocks run one by one. MUDD's final mix at init equals it: tests/features/test_mudd.py."""
import torch

import features.backout as backout_feature
import train_gpt as tg
from conftest import live_model, tokens_with_docs


def test_listed_skip_and_backout_by_hand():
    """--skip_pairs=0:2 --backout_layer=1: block 2's input gets w * block 0's output, and the head reads
    norm(x_final + lam * block 1's output); recomputed from the blocks one by one."""
    model = live_model("--skip_pairs=0:2", "--backout_layer=1")
    assert isinstance(model.backout, backout_feature.Backout) and {0, 1} <= model.kept_outputs
    with torch.no_grad():
        model.skip_weights.fill_(0.7)
        model.backout.lam.fill_(-0.3)
        x = tokens_with_docs(256, [0, 90])
        masks = model.attention_masks(x, model.default_window_blocks)
        ves = [ve(x)[None] for ve in model.value_embeds]
        h = x0 = tg.norm(model.embed(x)[None])
        outs = []
        for i, block in enumerate(model.blocks):
            if i == 2:
                h = h + 0.7 * outs[0]
            table = model.ve_table[i]
            h = block(h, x0, None if table is None else ves[table], masks[model.window_kind[i]])
            outs.append(h)
        ref = tg.norm(h - 0.3 * outs[1])[0]
        torch.testing.assert_close(model.hidden(x), ref, rtol=0, atol=0)
