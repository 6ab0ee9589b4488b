"""Issue 22, "nothing lost, nothing raw": a bad input or an environment fault makes each tool exit nonzero with one
error line that names the fix, never a Python traceback. Most cases run in-process (main(argv) returning an exit code
after printing the line, or raising SystemExit / argparse's exit, which Python prints without a traceback); a few
run in a subprocess to check what a user sees."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_error_line, load_script, write_shard
from tools import records


# argparse's "<prog>: error:" (prog: the script's name; in-process, pytest's own)
ARGPARSE = f"{Path(sys.argv[0]).name}: error:"


def run_tool(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


# -----------------------------------------------------------------------------------------------------------------
# tools/records.py


def test_records_missing_inputs_are_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["stats", str(missing)], ["no such record file or directory", str(missing)]),
             (["stats", str(empty), "--vs", str(missing)], ["no record files in", str(empty)]),  # the first only
             (["stats", str(empty)], ["no record files in", str(empty)]),
             (["table", "--records_dir", str(missing)], ["--records_dir", str(missing), "not a directory"])]
    for argv, needles in cases:
        assert records.main(argv) == 1, argv
        captured = capsys.readouterr()
        assert_one_error_line(captured.err, *needles)
        assert "| track |" not in captured.out  # table: no silent empty table
    # --vs alone missing: named as --vs
    (tmp_path / "records").mkdir()
    run = tmp_path / "records" / "t" / "2026-01-01_a" / "x.txt"
    run.parent.mkdir(parents=True)
    run.write_text("==================== log ====================\n")
    assert records.main(["stats", str(run.parent), "--vs", str(missing)]) == 1
    assert_one_error_line(capsys.readouterr().err, "--vs: no such record file or directory", str(missing))


def test_compare_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("compare read the records before checking --out")
    monkeypatch.setattr(records, "load_runs", no_work)
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / "missing_dir" / "cmp.png", "missing_dir does not exist"),
             (tmp_path / "afile" / "cmp.png", "afile is not a directory"),
             (tmp_path, "is a directory"),
             (tmp_path / "cmp.xyz", "cannot write .xyz files")]
    if Path("/proc/self").is_dir():  # a path no one can create, even as root
        cases.append((Path("/proc/records_cmp.png"), "cannot be written"))
    for out, needle in cases:
        assert records.main(["compare", str(tmp_path), "--out", str(out)]) == 1, out
        assert_one_error_line(capsys.readouterr().err, "--out", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the writability probe left nothing behind


def test_records_errors_in_a_subprocess(tmp_path):
    r = run_tool("tools/records.py", "stats", tmp_path / "nowhere")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert_one_error_line(r.stderr, "no such record file or directory")
    r = run_tool("tools/records.py", "compare", tmp_path, "--out", tmp_path / "no" / "cmp.png")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert_one_error_line(r.stderr, "does not exist")


# -----------------------------------------------------------------------------------------------------------------
# tools/sample.py: flags are checked before the tokenizer and the checkpoint are loaded

sample = load_script("tools/sample.py")


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "-1"), ("--top_p", "2"),
                                        ("--top_p", "0"), ("--top_p", "nan"), ("--max_new_tokens", "-5"),
                                        ("--top_k", "-1"), ("--beams", "-1"), ("--length_penalty", "nan"),
                                        ("--repetition_penalty", "nan"), ("--window_blocks", "0")])
def test_sample_rejects_bad_flags_before_loading(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # the checkpoint does not exist: the flag is reported first
        sample.main(["--checkpoint", str(tmp_path / "missing.pt"), flag, value])
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, flag, value, prefix=ARGPARSE)


def test_sample_missing_checkpoint_offline_tokenizer_and_unreadable_checkpoint(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        sample.main(["--checkpoint", str(tmp_path / "missing.pt")])
    assert_one_error_line(capsys.readouterr().err, "--checkpoint", "no such file", prefix=ARGPARSE)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as e:  # train_gpt's one-line message, which Python prints without a traceback
        sample.main(["--checkpoint", str(junk)])
    assert_one_error_line(e.value.code, "GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")

    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: object())  # the checkpoint is the next thing read
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(junk)])
    assert_one_error_line(e.value.code, str(junk), "not a readable checkpoint")


def test_sample_bad_flag_in_a_subprocess(tmp_path):
    r = run_tool("tools/sample.py", "--checkpoint", tmp_path / "missing.pt", "--temperature", "nan")
    assert r.returncode == 2
    assert_one_error_line(r.stderr, "--temperature", prefix="sample.py: error:")
    assert r.stderr.strip().splitlines()[-1].startswith("sample.py: error:")


# -----------------------------------------------------------------------------------------------------------------
# tools/eval.py

evaluate = load_script("tools/eval.py")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The smoke model's weights (val_tokens 4096, val_seq_len 1024) and one good 4097-token val shard."""
    import torch
    import train_gpt as tg
    from conftest import smoke_args
    root = tmp_path_factory.mktemp("eval_faults")
    write_shard(root / "val_000000.bin", torch.randint(0, 50257, (4097,), generator=torch.Generator().manual_seed(0)))
    args = smoke_args(f"--val_files={root / 'val_*.bin'}")
    torch.manual_seed(0)
    model = tg.build_model(args)
    return tg.save_checkpoint(root / "small.pt", model, [], args, 3, 0.0, weights_only=True), root


def eval_error(argv):
    """The SystemExit message of tools/eval.py main(argv): one line starting "error:", printed without a traceback."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error:") and "\n" not in e.value.code
    return e.value.code


def test_eval_flag_errors_name_the_flag(small_checkpoint):
    ckpt, root = small_checkpoint
    base = ["--checkpoint", str(ckpt), "--device", "cpu"]
    for value in ("-1", "0"):
        msg = eval_error(base + [f"--val_tokens={value}"])
        assert f"--val_tokens={value} must be >= 1" in msg and "--seq_len" not in msg
    msg = eval_error(base + ["--val_tokens=8192"])  # the shard holds 4097 tokens: 4096 usable
    assert "--val_tokens=8,192 is more than the val shards hold" in msg and "4,097 tokens" in msg, msg
    assert "4,096 of them usable" in msg
    assert "--seq_len=300 must be a positive multiple of 128" in eval_error(base + ["--seq_len=300"])
    assert "--seq_len=1024 must divide --val_tokens=1536" in eval_error(base + ["--seq_len=1024",
                                                                              "--val_tokens=1536"])
    msg = eval_error(base + ["--val_tokens=1000"])  # below the checkpoint's val_seq_len: also the sequence length
    assert "--val_tokens=1000 must be a multiple of 128" in msg and "--seq_len=" not in msg
    assert "--window_blocks=0 must be >= 1" in eval_error(base + ["--window_blocks=0"])
    msg = eval_error(base + [f"--val_files={root / 'nothing_*.bin'}"])
    assert "no val shards match --val_files=" in msg
    (root / "junk.pt").write_bytes(b"not a checkpoint")  # torch.load's error text spans lines: still one line
    msg = eval_error(["--checkpoint", str(root / "junk.pt"), "--device", "cpu"])
    assert "junk.pt is not a readable checkpoint" in msg and msg.endswith("(runs write *_stepN.pt and *_final.pt)")


@pytest.mark.parametrize("kind", ["magic", "truncated", "200 bytes"])
def test_eval_bad_val_shards_are_one_line(small_checkpoint, tmp_path, kind):
    ckpt, _ = small_checkpoint
    bad = tmp_path / "val_000000.bin"
    if kind == "200 bytes":
        bad.write_bytes(b"\0" * 200)
    else:
        write_shard(bad, list(range(4097)))
        data = bytearray(bad.read_bytes())
        if kind == "magic":
            data[:4] = (12345).to_bytes(4, "little")
        else:
            data = data[:-1000]
        bad.write_bytes(bytes(data))
    msg = eval_error(["--checkpoint", str(ckpt), "--device", "cpu", f"--val_files={tmp_path / 'val_*.bin'}"])
    assert msg.startswith("error: --val_files: ") and str(bad) in msg
    assert {"magic": "wrong magic number", "truncated": "truncated or corrupted",
            "200 bytes": "shorter than the 1024-byte header"}[kind] in msg, msg


# -----------------------------------------------------------------------------------------------------------------
# data/tokenize_text.py

tokenize_text = load_script("data/tokenize_text.py")


def tokenize_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize_text.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    assert e.value.code.startswith("tokenize_text: error: ")
    return e.value.code


def test_tokenize_text_bad_inputs(tmp_path, capsys):
    docs = b"".join(json.dumps({"text": f"document {i} " * 50}).encode() + b"\n" for i in range(200))
    packed = gzip.compress(docs)
    (tmp_path / "truncated.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(docs)  # named .gz, never compressed
    (tmp_path / "adir").mkdir()
    out = ["--out_dir", str(tmp_path / "out"), "--val_tokens", "10"]
    msg = tokenize_error([str(tmp_path / "truncated.jsonl.gz"), *out], capsys)
    assert "truncated.jsonl.gz: the gzip stream ends early" in msg
    msg = tokenize_error([str(tmp_path / "plain.jsonl.gz"), *out], capsys)
    assert "plain.jsonl.gz: not a valid gzip file" in msg
    msg = tokenize_error([str(tmp_path / "adir"), *out], capsys)
    assert "adir is a directory; give the .txt, .jsonl or .jsonl.gz files in it" in msg and "no such file" not in msg
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob(".*staging*"))


def test_tokenize_text_corrupt_gzip_in_a_subprocess(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    r = run_tool("data/tokenize_text.py", tmp_path / "bad.jsonl.gz", "--out_dir", tmp_path / "out")
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "bad.jsonl.gz", "gzip", prefix="tokenize_text: error:")
