"""train_gpt.py's shard reader and loader: validation errors, rank slices, targets, grad-accumulation coverage."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import load_script, write_shard

CPU = torch.device("cpu")


def test_tokenizer_tool_round_trip(tmp_path):
    tt = load_script("data/tokenize_text.py")
    docs = ["First document.", "Second one, a little longer than the first.", "Third!"]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d)
    tt.main([str(tmp_path / f"d{i}.txt") for i in range(3)] + ["--out_dir", str(tmp_path / "out"), "--name", "t",
                                                             "--val_tokens", "5", "--shard_size", "4"])
    stream = np.concatenate([tg.load_data_shard(p).numpy() for p in
                             tg.find_shards(str(tmp_path / "out" / "t_val_*.bin"), "val")
                             + tg.find_shards(str(tmp_path / "out" / "t_train_*.bin"), "train")])
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    expected = sum(([tg.EOT_TOKEN] + enc.encode_ordinary(d) for d in docs), [])
    assert stream.tolist() == expected


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_shard_errors_are_specific(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(good, range(100))
    assert tg.load_data_shard(good).tolist() == list(range(100))

    magic = tmp_path / "magic.bin"
    write_shard(magic, range(100))
    _corrupt(magic, 0, np.int32(1234).tobytes())
    with pytest.raises(tg.ShardError, match=r"magic.bin: wrong magic number 1234"):
        tg.load_data_shard(magic)

    version = tmp_path / "version.bin"
    write_shard(version, range(100))
    _corrupt(version, 4, np.int32(7).tobytes())
    with pytest.raises(tg.ShardError, match=r"version.bin: unsupported shard version 7"):
        tg.load_data_shard(version)

    truncated = tmp_path / "truncated.bin"
    write_shard(truncated, range(100))
    with open(truncated, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(tg.ShardError, match=r"truncated.bin: header says 100 tokens .* has 1174 bytes"):
        tg.load_data_shard(truncated)

    count = tmp_path / "count.bin"
    write_shard(count, range(100))
    _corrupt(count, 8, np.int32(5000).tobytes())
    with pytest.raises(tg.ShardError, match=r"count.bin: header says 5000 tokens"):
        tg.load_data_shard(count)

    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\x00" * 10)
    with pytest.raises(tg.ShardError, match="shorter than the 1024-byte header"):
        tg.load_data_shard(tiny)


def test_missing_shards_print_the_download_command(tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.find_shards(str(tmp_path / "nothing_*.bin"), "train")
    assert "python data/cached_fineweb10B.py" in str(e.value) and "data/tokenize_text.py" in str(e.value)


def _stream_shards(tmp_path, sizes):
    start = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"s_train_{i + 1:06d}.bin", np.arange(start, start + n) % 60000)
        start += n
    return str(tmp_path / "s_train_*.bin")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_are_disjoint_contiguous_and_cover_the_global_batch(tmp_path, world_size):
    args = tg.Hyperparameters(seq_len=128, micro_batches=4, num_iterations=5,
                              train_files=_stream_shards(tmp_path, [1200, 1600]))
    global_tokens = args.micro_batches * args.seq_len
    per_rank = [list(tg.train_batches(args, r, world_size, CPU)) for r in range(world_size)]
    # shard 1 (1200 tokens) fits 2 steps of 512(+1); its tail is skipped; shard 2 (1600) fits 3 more
    assert all(len(steps) == 5 for steps in per_rank)
    for step in range(5):
        shard_start, pos = (0, step) if step < 2 else (1200, step - 2)
        expected = np.arange(shard_start + pos * global_tokens, shard_start + (pos + 1) * global_tokens)
        micro = [m for r in range(world_size) for m in per_rank[r][step]]
        assert len(micro) == args.micro_batches and all(len(m[0]) == args.seq_len for m in micro)
        got = torch.cat([inputs for inputs, _ in micro]).numpy()
        assert np.array_equal(got, expected)  # ranks in order, contiguous, disjoint, covering the batch
        for inputs, targets in micro:
            assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
            assert np.array_equal(targets.numpy(), inputs.numpy() + 1)


def test_not_enough_train_data_names_the_fix(tmp_path):
    args = tg.Hyperparameters(seq_len=128, micro_batches=4, num_iterations=6,
                              train_files=_stream_shards(tmp_path, [1200, 1600]))
    with pytest.raises(SystemExit, match="holds 5 steps .* num_iterations=6; download more shards"):
        next(tg.train_batches(args, 0, 1, CPU))


def test_val_batches_read_the_first_val_tokens(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(5000))
    args = tg.Hyperparameters(val_seq_len=256, val_tokens=2048, val_files=str(tmp_path / "v_val_*.bin"))
    batches = [tg.val_batches(args, r, 2, CPU) for r in range(2)]
    assert len(batches[0]) == 4
    got = torch.cat([batches[r][s][0] for s in range(4) for r in range(2)]).numpy()
    assert np.array_equal(got, np.arange(2048))
    with pytest.raises(SystemExit, match="lower --val_tokens"):
        tg.val_batches(tg.Hyperparameters(val_seq_len=256, val_tokens=8192, val_files=args.val_files), 0, 1, CPU)
