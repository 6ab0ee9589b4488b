"""Document-aligned batches (--bos_align, features/bos_align.py; frontier recipe 1.1): sequences start at documents,
capped per stage, nothing read twice; the same batches on one rank and two and on resume; running out of tokens or
documents with a clear error. End to end in the frontier smoke runs: tests/core/test_frontier.py."""
import numpy as np
import pytest
import torch

import features.bos_align as bos_align
import train_gpt as tg
from conftest import write_shard


def write_documents(path, lengths, first_value=1):
    """A shard of documents: EOT, then length - 1 tokens with values unique across the whole test (increasing)."""
    tokens, value = [], first_value
    for n in lengths:
        tokens += [tg.EOT_TOKEN] + list(range(value, value + n - 1))
        value += n - 1
    write_shard(path, tokens)
    return value


@pytest.fixture()
def document_shards(tmp_path):
    rng = np.random.default_rng(0)
    value = write_documents(tmp_path / "d_train_000001.bin", rng.integers(20, 400, 120).tolist())
    write_documents(tmp_path / "d_train_000002.bin", rng.integers(20, 400, 120).tolist(), value)
    return str(tmp_path / "d_train_*.bin")


def loader_args(train_files, *flags):
    return tg.apply_overrides(tg.Hyperparameters(), [
        f"--train_files={train_files}", "--bos_align=true", "--micro_batches=4", "--num_iterations=6",
        "--stages=128:100:1-1:1.0,256:200:1-2:1.0,384:300:1-3:1.0", "--extension_steps=2", *flags])


def test_aligned_sequences_start_at_documents_with_caps_and_no_token_twice(document_shards):
    args = loader_args(document_shards)
    batches = list(bos_align.aligned_train_batches(args, 0, 1, torch.device("cpu")))
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    seen = []
    for step, batch in enumerate(batches):
        stage = tg.stage_at(step, tg.training_stages(args))
        for inputs, targets in batch:
            assert inputs[0] == tg.EOT_TOKEN and len(inputs) == len(targets) == stage.seq_len
            assert torch.equal(inputs[1:], targets[:-1])
            sequence = torch.cat([inputs, targets[-1:]]).tolist()
            starts = [i for i, t in enumerate(sequence) if t == tg.EOT_TOKEN] + [len(sequence)]
            assert max(b - a for a, b in zip(starts, starts[1:])) <= stage.doc_cap
            seen += [t for t in sequence if t != tg.EOT_TOKEN]
    assert len(seen) == len(set(seen)) and seen == sorted(seen)  # stream order, nothing read twice
    # the skipped tail of a capped document: a 100-token cap in stage 1 drops tokens of longer documents
    assert seen[-1] - seen[0] + 1 > len(seen)


def test_aligned_loader_same_on_two_ranks_and_on_resume(document_shards):
    args = loader_args(document_shards)
    device = torch.device("cpu")
    one = list(bos_align.aligned_train_batches(args, 0, 1, device))
    ranks = [list(bos_align.aligned_train_batches(args, r, 2, device)) for r in range(2)]
    for step in range(len(one)):
        two = ranks[0][step] + ranks[1][step]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one[step], two))
    resumed = list(bos_align.aligned_train_batches(args, 1, 2, device, start_step=3))
    assert len(resumed) == 5
    assert all(torch.equal(a[0], b[0]) for s in range(5) for a, b in zip(resumed[s], ranks[1][s + 3]))


def test_aligned_loader_runs_out_with_a_clear_error(document_shards):
    args = loader_args(document_shards, "--num_iterations=300", "--extension_steps=0")
    with pytest.raises(SystemExit, match="download more shards"):
        bos_align.require_train_data(tg.find_shards(args.train_files, "train"), args)
    stream = bos_align.DocumentStream(tg.find_shards(args.train_files, "train"))
    with pytest.raises(RuntimeError, match="ran out of documents"):
        for _ in range(1000):
            stream.sequence(385, 300)
