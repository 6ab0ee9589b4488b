import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _load(name):
    # data/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = _load("tokenize_text")
dl = _load("cached_fineweb10B")
enc = tiktoken.get_encoding("gpt2")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🙂 and\nnewlines\n\n  with  spaces.",
    "Numbers 12345 and code: def f(x): return x ** 2",
    "A final document that is somewhat longer than the others, " * 5,
]


def expected_stream(docs):
    ids = []
    for doc in docs:
        ids += [tt.EOT] + enc.encode_ordinary(doc)
    return np.array(ids, dtype=np.uint16)


def read_output(out_dir, name):
    val = sorted(Path(out_dir).glob(f"{name}_val_*.bin"))
    train = sorted(Path(out_dir).glob(f"{name}_train_*.bin"))
    return [tt.read_shard(p) for p in val], [tt.read_shard(p) for p in train]


def run(inputs, out_dir, *options):
    tt.main([str(p) for p in inputs] + ["--out_dir", str(out_dir), *map(str, options)])


# ----------------------------------------------------------------------------------------------------------------
# tokenize_text


def test_round_trip_txt_files(tmp_path):
    paths = []
    for i, doc in enumerate(DOCS):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    run(paths, tmp_path / "out", "--val_tokens", 50, "--shard_size", 40)

    expected = expected_stream(DOCS)
    val, train = read_output(tmp_path / "out", "doc0")  # default name: first input's stem
    assert [len(s) for s in val] == [51]  # val_tokens inputs + their last target
    assert [len(s) for s in train[:-1]] == [40] * (len(train) - 1) and 0 < len(train[-1]) <= 40
    assert np.array_equal(np.concatenate(val + train), expected)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"doc0_val_000000.bin"} | {f"doc0_train_{i:06d}.bin" for i in range(1, len(train) + 1)}


def test_jsonl_and_gzipped_jsonl(tmp_path):
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
    plain, zipped = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_text("\n".join(lines[:2]) + "\n\n", encoding="utf-8")  # a blank line is skipped
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[2:]) + "\n")
    run([plain, zipped], tmp_path / "out", "--text_field", "body", "--name", "mix", "--val_tokens", 10)

    val, train = read_output(tmp_path / "out", "mix")
    assert np.array_equal(np.concatenate(val + train), expected_stream(DOCS))


def test_separator_splits_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n" + "\n\n\n".join(DOCS) + "\n\n\n \n\n\n", encoding="utf-8")
    run([path], tmp_path / "out", "--separator", r"\n\n\n", "--val_tokens", 7)  # escapes as typed in a shell

    val, train = read_output(tmp_path / "out", "corpus")
    assert np.array_equal(np.concatenate(val + train), expected_stream(DOCS))  # empty/blank documents dropped


def test_long_documents_are_tokenized_in_exact_pieces(tmp_path, monkeypatch):
    # Tiny read/piece sizes force the streaming cuts; the tokens must still equal encoding the text whole.
    monkeypatch.setattr(tt, "READ_CHARS", 97)
    monkeypatch.setattr(tt, "PIECE_CHARS", 300)
    monkeypatch.setattr(tt, "BATCH_CHARS", 1000)
    # Mixed spaces, punctuation and newlines: cutting mid-word or after a space would change the tokens.
    docs = ["".join(f"w{i} and,{' ' * (i % 40)}\n" for i in range(n)) for n in (400, 5, 900)]
    path = tmp_path / "long.txt"
    path.write_text("<SEP>".join(docs), encoding="utf-8")
    pieces = list(tt.read_pieces([path], "<SEP>", "text"))
    assert sum(starts_doc for starts_doc, _ in pieces) == 3 and len(pieces) > 30
    run([path], tmp_path / "out", "--separator", "<SEP>", "--val_tokens", 100, "--shard_size", 1000)

    val, train = read_output(tmp_path / "out", "long")
    assert np.array_equal(np.concatenate(val + train), expected_stream(docs))


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared tinyshakespeare.txt not present")
def test_tinyshakespeare_slice(tmp_path, monkeypatch):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(tt, "PIECE_CHARS", 10_000)  # also cut this one document into ~20 pieces
    run([tmp_path / "shakespeare.txt"], tmp_path / "out", "--val_tokens", 5000, "--shard_size", 20_000)

    val, train = read_output(tmp_path / "out", "shakespeare")
    assert np.array_equal(np.concatenate(val + train), expected_stream([text]))
    assert len(train) > 1


def test_missing_text_field_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "oops"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: no string field 'text'"):
        run([path], tmp_path / "out", "--val_tokens", 1)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written, staging removed


def test_non_utf8_input_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 10)
    with pytest.raises(SystemExit, match=r"latin1\.txt: not UTF-8"):
        run([tmp_path / "latin1.txt"], tmp_path / "out", "--val_tokens", 1)


def test_too_short_stream_is_an_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(DOCS[0], encoding="utf-8")
    n = len(expected_stream(DOCS[:1]))
    with pytest.raises(SystemExit, match=rf"only {n} tokens.*(smaller --val_tokens|more text)"):
        run([path], tmp_path / "out")
    with pytest.raises(SystemExit, match=rf"only {n} tokens"):
        run([path], tmp_path / "out", "--val_tokens", n)  # exactly val_tokens leaves nothing for training
    assert list((tmp_path / "out").iterdir()) == []


def test_refuses_to_overwrite_and_overwrite_drops_stale_shards(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" ".join(DOCS), encoding="utf-8")
    run([path], tmp_path / "out", "--val_tokens", 10, "--shard_size", 10)
    before = sorted((tmp_path / "out").iterdir())
    assert len(before) > 3
    with pytest.raises(SystemExit, match="--overwrite"):
        run([path], tmp_path / "out", "--val_tokens", 10, "--shard_size", 10)
    assert sorted((tmp_path / "out").iterdir()) == before

    run([path], tmp_path / "out", "--val_tokens", 10, "--overwrite")  # one big train shard now
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t_train_000001.bin", "t_val_000000.bin"]


def test_shard_io_checks(tmp_path):
    tokens = np.array([0, 1, 50256, 65535], dtype=np.int64)
    tt.write_shard(tmp_path / "ok.bin", tokens)
    raw = (tmp_path / "ok.bin").read_bytes()
    assert len(raw) == 1024 + 2 * 4
    assert list(np.frombuffer(raw[:12], dtype="<i4")) == [20240520, 1, 4]
    assert np.array_equal(tt.read_shard(tmp_path / "ok.bin"), tokens)

    with pytest.raises(ValueError, match="uint16"):
        tt.write_shard(tmp_path / "big.bin", np.array([65536]))

    def corrupt(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    with pytest.raises(ValueError, match=r"magic\.bin: bad magic"):
        tt.read_shard(corrupt("magic.bin", b"\0\0\0\0" + raw[4:]))
    header[1] = 2
    with pytest.raises(ValueError, match=r"version\.bin: unsupported shard version 2"):
        tt.read_shard(corrupt("version.bin", header.tobytes() + raw[1024:]))
    with pytest.raises(ValueError, match=r"short\.bin: file is 1030 bytes but its header says 4 tokens"):
        tt.read_shard(corrupt("short.bin", raw[:-2]))


def test_cli_subprocess(tmp_path):
    path = tmp_path / "cli.txt"
    path.write_text(" ".join(DOCS), encoding="utf-8")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "data/tokenize_text.py", str(path), "--out_dir", str(out),
                             "--val_tokens", "20", "--shard_size", "1_000"],
                            cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (f"python train_gpt.py --preset=smoke --train_files='{out}/cli_train_*.bin' "
            f"--val_files='{out}/cli_val_*.bin'") in result.stdout
    val, train = read_output(out, "cli")
    assert np.array_equal(np.concatenate(val + train), expected_stream([" ".join(DOCS)]))


# ----------------------------------------------------------------------------------------------------------------
# cached_fineweb10B


class FakeHub:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, repo_id, filename, *, repo_type=None, local_dir=None):
        self.calls.append((repo_id, filename, repo_type))
        if filename == self.fail_on:
            raise ConnectionError("Name or service not known")
        tt.write_shard(Path(local_dir) / filename, np.arange(3))
        return str(Path(local_dir) / filename)


def test_shard_names():
    assert dl.shard_names(0) == ["fineweb_val_000000.bin"]
    assert dl.shard_names(2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert dl.shard_names(103)[-1] == "fineweb_train_000103.bin"
    with pytest.raises(ValueError, match="103"):
        dl.shard_names(104)


def test_download_fetches_missing_files_only(tmp_path):
    tt.write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(5))  # already present
    hub = FakeHub()
    paths = dl.download(3, tmp_path, hf_hub_download=hub)

    assert hub.calls == [("kjj0/fineweb10B-gpt2", name, "dataset") for name in
                         ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000003.bin"]]
    assert [p.name for p in paths] == dl.shard_names(3)
    assert len(tt.read_shard(tmp_path / "fineweb_train_000002.bin")) == 5  # untouched


def test_unreachable_hub_exits_with_a_clear_message(tmp_path, monkeypatch):
    hub = FakeHub(fail_on="fineweb_train_000001.bin")
    with pytest.raises(dl.DownloadError) as info:
        dl.download(2, tmp_path, hf_hub_download=hub)
    message = str(info.value)
    for needle in ("fineweb_train_000001.bin", "kjj0/fineweb10B-gpt2", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                   "data/tokenize_text.py", "Name or service not known"):
        assert needle in message
    assert len(hub.calls) == 2  # stopped at the failure

    # The real CLI with the real huggingface_hub in offline mode: no network is touched, and it exits cleanly.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "data/cached_fineweb10B.py", "1", "--out_dir", str(tmp_path / "fw")],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "Could not download fineweb_val_000000.bin" in result.stderr and "kjj0/fineweb10B-gpt2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("n", ["-1", "104"])
def test_downloader_rejects_bad_shard_counts(n, capsys):
    with pytest.raises(SystemExit):
        dl.main([n, "--out_dir", "unused"])
    assert "between 0 and 103" in capsys.readouterr().err


def test_a_val_shard_made_with_val_tokens_n_serves_val_tokens_n(tmp_path):
    import train_gpt as tg
    text = " ".join(f"word{i} and more text" for i in range(3000))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    run([tmp_path / "t.txt"], tmp_path / "out", "--val_tokens", 1024, "--name", "t")
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", f"--val_files={tmp_path}/out/t_val_*.bin",
                                                     "--val_tokens=1024", "--val_seq_len=1024"])
    batches = tg.val_batches(args, 0, 1, torch.device("cpu"))
    assert len(batches) == 1 and len(batches[0][0]) == 1024
