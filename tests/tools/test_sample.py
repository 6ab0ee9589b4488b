"""Generation: the KV cache reproduces full forward passes (documents, windows, GQA, MLA); greedy equals the argmax
of repeated full forwards; one-beam search equals greedy; beam scores are sorted; a model trained on a repeating
pattern reproduces it."""
import pytest
import torch

import train_gpt as tg
from conftest import cached_logits, load_script, smoke_args, smoke_model

sample = load_script("tools/sample.py")


def random_model(*extra, seed=0):
    return smoke_model(*extra, seed=seed, std=0.05).eval()


@pytest.mark.parametrize("extra", [[], ["--n_kv_heads=1"], ["--mla_kv_rank=32", "--mla_rope_dim=16"],
                                   ["--rope=canonical"], ["--rope=canonical", "--mla_kv_rank=32", "--mla_rope_dim=16"]])
def test_kv_cache_equals_full_forward(extra):
    model = random_model(*extra)
    x = torch.randint(0, 50000, (300,))
    x[[0, 100, 250]] = tg.EOT_TOKEN  # documents, one crossing a 128-block, windows of 2 and 1 blocks cut them
    with torch.no_grad():
        full = model(torch.cat([x, torch.zeros(84, dtype=x.dtype)]), window_blocks=2)[:300]
    torch.testing.assert_close(cached_logits(model, x, 2), full, rtol=1e-4, atol=1e-4)


def test_greedy_equals_argmax_of_full_forwards():
    model = random_model()
    prompt = [tg.EOT_TOKEN, 464, 3290, 318]
    out = sample.generate(model, prompt, 12, temperature=0.0, stop_at_eot=False)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            padded = torch.tensor(seq + [0] * (-len(seq) % 128))
            seq.append(int(model(padded)[len(seq) - 1][:model.vocab_size].argmax()))
    assert out == seq[len(prompt):]


def test_beam_search():
    model = random_model(seed=1)
    prompt = [tg.EOT_TOKEN, 40, 588]
    greedy = sample.generate(model, prompt, 8, temperature=0.0)
    one = sample.beam_search(model, prompt, 8, beams=1)
    assert one[0][1] == greedy
    results = sample.beam_search(model, prompt, 8, beams=4)
    scores = [s for s, _ in results]
    assert len(results) == 4 and scores == sorted(scores, reverse=True)
    assert results[0][0] >= one[0][0] - 1e-6  # a wider beam never finds a worse best hypothesis here


def test_sampling_filters_and_seed():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.isinf(sample.filter_logits(logits, top_k=2)).tolist() == [False, False, True, True, True]
    kept = ~torch.isinf(sample.filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [True, True, False, False, False]  # p = .64, .24: the first two reach 0.8
    model = random_model()
    runs = [sample.generate(model, [tg.EOT_TOKEN, 11], 10, temperature=1.0, top_k=50,
                            generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_trained_model_reproduces_a_pattern():
    torch.manual_seed(0)
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--micro_batches=1", "--num_iterations=40"])
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    pattern = [318, 257, 3797, 11, 290, 340, 13]
    x = torch.tensor(([tg.EOT_TOKEN] + pattern * 80)[:513])
    for step in range(40):
        tg.train_step(model, opts, [(x[:-1], x[1:])], 4, args, step, 1)
    out = sample.generate(model.eval(), [tg.EOT_TOKEN] + pattern[:3], 14, temperature=0.0)
    assert out == (pattern * 3)[3:17]


# -----------------------------------------------------------------------------------------------------------------
# Padded batches

PROMPTS = [
    [tg.EOT_TOKEN, 464, 3290, 318],
    [tg.EOT_TOKEN],
    [tg.EOT_TOKEN, 40, 588, 11, tg.EOT_TOKEN, 1212, 318, 257, 1332],  # a document boundary inside the prompt
    [tg.EOT_TOKEN] + list(range(1000, 1139)),  # 140 tokens: crosses a 128-token block, cut by a 1-block window
]


@pytest.mark.parametrize("extra,penalty", [([], 1.0), ([], 1.3), (["--n_kv_heads=1"], 1.0),
                                           (["--mla_kv_rank=32", "--mla_rope_dim=16"], 1.0)])
def test_batched_greedy_equals_each_prompt_alone(extra, penalty):
    model = random_model(*extra)
    for window_blocks in (1, 2) if extra == [] and penalty == 1.0 else (1,):
        alone = [sample.generate(model, p, 10, window_blocks=window_blocks, stop_at_eot=False,
                                 repetition_penalty=penalty) for p in PROMPTS]
        batched = sample.generate_batch(model, PROMPTS, 10, window_blocks=window_blocks, stop_at_eot=False,
                                        repetition_penalty=penalty)
        assert batched == alone, window_blocks
    assert len({tuple(a) for a in alone}) == len(PROMPTS)  # the rows really differ


def test_batch_step_logits_match_single_decoding():
    """Beyond the argmax: the logits of every row and step agree with the single-prompt cache to float tolerance."""
    model = random_model(seed=2)
    steps = [[tg.EOT_TOKEN, 11], [220, 13], [318, 257]]  # tokens fed after the prompts, one list per step
    cache = sample.BatchKVCache([len(p) for p in PROMPTS])
    batched = []
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS[:2]):
            cache.start_row(b)
            batched.append([model.logits(model.hidden(torch.tensor(prompt), 2, cache=cache))[-1]])
        with pytest.raises(RuntimeError, match=r"rows \[2, 3\] were never prefilled"):
            cache.stack()
        cache = sample.BatchKVCache([len(p) for p in PROMPTS[:2]])
        for b, prompt in enumerate(PROMPTS[:2]):
            cache.start_row(b)
            model.hidden(torch.tensor(prompt), 2, cache=cache)
        cache.stack()
        rows = [model.logits(model.hidden(torch.tensor(step), 2, cache=cache)) for step in steps]
        for b, prompt in enumerate(PROMPTS[:2]):
            single = tg.KVCache()
            model.hidden(torch.tensor(prompt), 2, cache=single)
            for step, logits in zip(steps, rows):
                alone = model.logits(model.hidden(torch.tensor(step[b:b + 1]), 2, cache=single))[-1]
                torch.testing.assert_close(logits[b], alone, rtol=1e-4, atol=1e-4)


def test_rows_that_end_early_stop_while_the_others_go_on():
    """End-of-text made the argmax wherever one chosen token would have been: rows end at different steps, each
    exactly where decoding it alone ends."""
    model = random_model(seed=3)
    with torch.no_grad():
        chosen = sample.generate(model, PROMPTS[0], 3, stop_at_eot=False)[2]
        head = model.lm_head.weight
        head[tg.EOT_TOKEN] = 1.5 * head[chosen]
    alone = [sample.generate(model, p, 8) for p in PROMPTS]
    assert sample.generate_batch(model, PROMPTS, 8) == alone
    lengths = [len(a) for a in alone]
    assert min(lengths) < 8 and max(lengths) == 8 and all(a[-1] == tg.EOT_TOKEN for a in alone if len(a) < 8)


def test_generate_batch_refuses_what_it_cannot_decode():
    model = random_model()
    with pytest.raises(ValueError, match="at least one token"):
        sample.generate_batch(model, [[tg.EOT_TOKEN], []], 4)
    limit = sample.rotary_length(model)
    with pytest.raises(ValueError, match=f"need rotary position .* but the model has {limit}; lower"):
        sample.generate_batch(model, [[tg.EOT_TOKEN]] * 3, limit)
    with pytest.raises(ValueError, match="--mot models .* one prompt at a time"):
        sample.generate_batch(random_model("--mot=cross"), PROMPTS[:2], 2)


def test_prompts_file_on_the_command_line(tmp_path, capsys):
    model = random_model()
    args = smoke_args()
    tg.save_checkpoint(tmp_path / "m.pt", model, tg.build_optimizers(model, args), args, 0, 0.0)
    (tmp_path / "prompts.txt").write_text("The cat\n\nOnce upon a time there was\nHello\n")
    common = ["--checkpoint", str(tmp_path / "m.pt"), "--greedy", "--max_new_tokens", "4", "--device", "cpu"]
    result = sample.main([*common, "--prompts_file", str(tmp_path / "prompts.txt"), "--batch_size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert result["prompts"] == 3 and result["batch_size"] == 2 and len(lines) == 4
    for text, line in zip(["The cat", "Once upon a time there was", "Hello"], lines):
        sample.main([*common, "--prompt", text])
        assert capsys.readouterr().out.splitlines()[0] == line and line.startswith(text)
    (tmp_path / "blank.txt").write_text("\n  \n")
    for bad, message in ((["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
                         (["--prompts_file", str(tmp_path / "none.txt")], "none.txt: No such file"),
                         (["--prompts_file", str(tmp_path / "blank.txt")], "holds no prompt")):
        with pytest.raises(SystemExit):
            sample.main([*common, *bad])
        assert message in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------------------
# Repetition penalty


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = sample.apply_repetition_penalty(logits, [0, 1, 1, 7], 2.0)  # 7: a padded-vocab id, ignored
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # seen: positive halved, negative doubled; unseen unchanged
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the input is left alone
    assert sample.apply_repetition_penalty(logits, [0, 1], 1.0) is logits


class ConstantLogits:
    """A hand-made 'model' for generate/beam_search: the same logits [2, 1, -1] after every token."""
    vocab_size = 3
    embed = torch.nn.Embedding(1, 1)

    def hidden(self, tokens, window_blocks=None, cache=None):
        return tokens

    def logits(self, tokens):
        return torch.tensor([2.0, 1.0, -1.0]).expand(len(tokens), 3)


def test_repetition_penalty_in_greedy_sampling_and_beam_search():
    """Prompt [2], penalty 3: step 1 sees {2}: [2, 1, -3] -> 0; step 2 sees {0, 2}: [2/3, 1, -3] -> 1; step 3 sees
    all: [2/3, 1/3, -3] -> 0, and 0 from then on. Without the penalty: always 0."""
    model = ConstantLogits()
    assert sample.generate(model, [2], 4, stop_at_eot=False) == [0, 0, 0, 0]
    assert sample.generate(model, [2], 4, stop_at_eot=False, repetition_penalty=3.0) == [0, 1, 0, 0]
    # sampling with top_k=1 keeps only the penalized argmax
    gen = torch.Generator().manual_seed(0)
    assert sample.generate(model, [2], 4, temperature=1.0, top_k=1, generator=gen, stop_at_eot=False,
                           repetition_penalty=3.0) == [0, 1, 0, 0]
    (score, tokens), = sample.beam_search(model, [2], 3, beams=1, repetition_penalty=3.0)
    assert tokens == [0, 1, 0]
    expected = [torch.tensor(row).log_softmax(-1)[t].item()
                for row, t in (([2.0, 1.0, -3.0], 0), ([2 / 3, 1.0, -3.0], 1), ([2 / 3, 1 / 3, -3.0], 0))]
    assert score == pytest.approx(sum(expected) / 3)
    assert sample.beam_search(model, [2], 3, beams=1)[0][1] == [0, 0, 0]
