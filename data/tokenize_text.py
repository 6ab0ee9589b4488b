"""Tokenize local text with GPT-2's BPE into token shards in the same format as the FineWeb download.

    python data/tokenize_text.py ../shared/data/wikipedia_en_100M.jsonl.gz --out_dir data/local/wiki

Inputs: .txt (the whole file is one document, or split into documents on --separator) and .jsonl / .jsonl.gz
(one JSON object per line; the document is its --text_field). The end-of-text token 50256 precedes every document.
The first --val_tokens tokens of the stream become NAME_val_000000.bin, the rest NAME_train_000001.bin,
NAME_train_000002.bin, ... of --shard_size tokens each (the last may be shorter). NAME defaults to the first
input's file name without its .txt/.jsonl/.gz suffixes.

Shard format: 256 little-endian int32 header words [magic 20240520, version 1, token count, 0...], then the
tokens as little-endian uint16.

Input is streamed: memory holds one shard buffer plus one batch of text, whatever the input size (long documents
are cut for encoding at " word" boundaries, which leaves the tokens unchanged). Shards are staged in a hidden
directory and moved into --out_dir only when the whole run succeeds.
"""

import argparse
import codecs
import glob
import gzip
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

MAGIC, VERSION = 20240520, 1
HEADER_WORDS = 256
HEADER_BYTES = 4 * HEADER_WORDS
EOT = 50256  # GPT-2 <|endoftext|>
READ_CHARS = 1 << 20  # .txt files are read this many characters at a time
PIECE_CHARS = 1 << 20  # longer documents are encoded in pieces (bounded memory, and they spread over threads)
BATCH_CHARS = 1 << 22  # characters handed to tiktoken per encode_ordinary_batch call


class TokenizeError(Exception):
    """A problem with the inputs or arguments; main() prints it without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Shard files


def write_shard(path, tokens: np.ndarray) -> None:
    """Writes tokens as one shard; the temp file + rename means readers never see a half-written shard."""
    path, tokens = Path(path), np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 count in the header")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_shard(path) -> np.ndarray:
    """Returns a shard's tokens as uint16, after checking magic, version and that the length matches the count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: file is {size} bytes but its header says {count} tokens "
                         f"({HEADER_BYTES + 2 * count} bytes); truncated or corrupt")
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).astype(np.uint16, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# Reading documents as (starts_document, text) pieces


def _input_kind(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    for kind in ("txt", "jsonl"):
        if name.endswith("." + kind):
            return kind
    raise TokenizeError(f"{path}: unsupported input type; expected .txt, .jsonl or .jsonl.gz (.txt.gz also works)")


def default_name(path) -> str:
    """wiki.jsonl.gz -> wiki: the first input's file name minus its .gz/.jsonl/.txt suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".txt"):
        name = name.removesuffix(suffix)
    return name


def _open_text(path: Path):
    # Universal newlines, so that a separator such as "\n\n\n" also splits files written with \r\n.
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last index in (lo, hi) of a space between a printable ASCII character and an ASCII letter, else -1.

    GPT-2's pre-tokenizer always starts a new token there (" word"), and no token spans it, so encoding the text
    on each side separately gives exactly the tokens of encoding the whole."""
    i = hi
    while (i := text.rfind(" ", lo + 1, i)) > lo:
        after = text[i + 1:i + 2]
        if "!" <= text[i - 1] <= "~" and after.isascii() and after.isalpha():
            return i
    return -1


def _doc_pieces(text: str, starts_doc: bool = True) -> Iterator[tuple[bool, str]]:
    start = 0
    while len(text) - start > PIECE_CHARS and (cut := _safe_cut(text, start, start + PIECE_CHARS)) > 0:
        yield starts_doc, text[start:cut]
        start, starts_doc = cut, False
    rest = text[start:]
    if rest and (rest.strip() or not starts_doc):  # skip empty and whitespace-only documents, not their tails
        yield starts_doc, rest


def _txt_pieces(path: Path, separator: str | None) -> Iterator[tuple[bool, str]]:
    sep_len = len(separator) if separator else 0
    buf, starts_doc = "", True
    with _open_text(path) as f:
        while chunk := f.read(READ_CHARS):
            buf += chunk
            if separator:
                *docs, buf = buf.split(separator)
                for doc in docs:
                    yield from _doc_pieces(doc, starts_doc)
                    starts_doc = True
            # Flush the unfinished document's head so one huge document never sits in memory whole; the last
            # sep_len characters stay behind in case they begin a separator.
            if len(buf) > PIECE_CHARS and (cut := _safe_cut(buf, 0, len(buf) - sep_len)) > 0:
                yield starts_doc, buf[:cut]
                buf, starts_doc = buf[cut:], False
    yield from _doc_pieces(buf, starts_doc)


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[tuple[bool, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizeError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                raise TokenizeError(f"{path}:{lineno}: no string field {text_field!r} ({found}); "
                                    "choose the field with --text_field")
            yield from _doc_pieces(record[text_field])


def read_pieces(paths: Iterable[Path], separator: str | None, text_field: str) -> Iterator[tuple[bool, str]]:
    """All inputs' documents in order, as (starts_document, text) pieces."""
    for path in paths:
        try:
            if _input_kind(path) == "txt":
                yield from _txt_pieces(path, separator)
            else:
                yield from _jsonl_pieces(path, text_field)
        except UnicodeDecodeError as e:
            raise TokenizeError(f"{path}: not UTF-8 text ({e})") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise TokenizeError(f"{path}: not a valid gzip file ({e}); download or compress it again, or give it "
                                "uncompressed without the .gz suffix") from None
        except EOFError:
            raise TokenizeError(f"{path}: the gzip stream ends early (a truncated file); download or compress it "
                                "again") from None
        except OSError as e:
            raise TokenizeError(f"{path}: cannot read it ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing and sharding


def _gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise TokenizeError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); tiktoken downloads its BPE "
                            "files on first use, so without network set TIKTOKEN_CACHE_DIR to a directory that "
                            "holds them (e.g. ../shared/tiktoken_cache)") from None


def _encode(batch: list[tuple[bool, str]], enc, threads: int) -> tuple[np.ndarray, int]:
    ids = []
    for (starts_doc, _), tokens in zip(batch, enc.encode_ordinary_batch([t for _, t in batch], num_threads=threads)):
        if starts_doc:
            ids.append(EOT)
        ids += tokens
    arr = np.array(ids, dtype=np.int64)
    assert arr.size == 0 or arr.max() < 2**16, "token ids must fit in uint16"
    return arr.astype(np.uint16), sum(starts_doc for starts_doc, _ in batch)


def encode_batches(pieces: Iterable[tuple[bool, str]], enc, threads: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (tokens, documents started) for batches of about BATCH_CHARS characters."""
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if chars >= BATCH_CHARS:
            yield _encode(batch, enc, threads)
            batch, chars = [], 0
    if batch:
        yield _encode(batch, enc, threads)


class ShardWriter:
    """Cuts a token stream into NAME_val_000000.bin (the first val_tokens + 1: the last one is only a target, so
    train_gpt.py --val_tokens=val_tokens can read the whole shard) and NAME_train_NNNNNN.bin shards of shard_size
    tokens, written into a staging directory inside out_dir until commit()."""

    def __init__(self, out_dir: Path, name: str, val_tokens: int, shard_size: int):
        self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
        self.staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging.", dir=out_dir))
        self.shards: list[tuple[str, int]] = []  # (file name, tokens)
        self.buf, self.fill, self.total = np.empty(val_tokens + 1, dtype=np.uint16), 0, 0

    def add(self, tokens: np.ndarray) -> None:
        self.total += len(tokens)
        while len(tokens):
            n = min(len(self.buf) - self.fill, len(tokens))
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        index = len(self.shards)
        file_name = f"{self.name}_{'train' if index else 'val'}_{index:06d}.bin"
        write_shard(self.staging / file_name, self.buf[:self.fill])
        self.shards.append((file_name, self.fill))
        if len(self.buf) != self.shard_size:
            self.buf = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0

    def finish(self) -> None:
        """Writes the last, possibly short, train shard."""
        if self.fill and self.shards:
            self._flush()

    def commit(self, replace: list[Path]) -> list[tuple[Path, int]]:
        """Moves the staged shards into out_dir after deleting `replace` (the old shards of this name, so that
        stale higher-numbered train shards cannot leak into a NAME_train_*.bin glob)."""
        for path in replace:
            path.unlink()
        for file_name, _ in self.shards:
            os.replace(self.staging / file_name, self.out_dir / file_name)
        return [(self.out_dir / file_name, count) for file_name, count in self.shards]

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def existing_shards(out_dir: Path, name: str) -> list[Path]:
    return sorted(p for kind in ("val", "train") for p in out_dir.glob(f"{glob.escape(name)}_{kind}_*.bin"))


def tokenize(inputs: list, out_dir, name: str | None = None, val_tokens: int = 10_485_760,
             shard_size: int = 100_000_000, separator: str | None = None, text_field: str = "text",
             overwrite: bool = False, progress: bool = True) -> tuple[list[tuple[Path, int]], int]:
    """Tokenizes inputs into shards in out_dir; returns ([(path, tokens)], documents)."""
    inputs, out_dir = [Path(p) for p in inputs], Path(out_dir)
    for path in inputs:
        if path.is_dir():
            raise TokenizeError(f"{path} is a directory; give the .txt, .jsonl or .jsonl.gz files in it (e.g. "
                                f"{shlex.quote(str(path))}/*.jsonl.gz)")
        if not path.is_file():
            raise TokenizeError(f"{path}: no such file")
        _input_kind(path)
    if val_tokens < 1 or not 1 <= shard_size < 2**31:
        raise TokenizeError("--val_tokens must be >= 1 and --shard_size between 1 and 2**31 - 1")
    name = name or default_name(inputs[0])
    if not name or "/" in name or os.sep in name:
        raise TokenizeError(f"--name must be a non-empty file name prefix, got {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    old = existing_shards(out_dir, name)
    if old and not overwrite:
        raise TokenizeError(f"{out_dir} already holds {len(old)} shard(s) named {name}_* (e.g. {old[0].name}); "
                            "pass --overwrite to replace them, or choose another --name or --out_dir")
    enc = _gpt2()
    writer = ShardWriter(out_dir, name, val_tokens, shard_size)
    docs, start = 0, time.monotonic()
    last_report = start
    try:
        for tokens, started in encode_batches(read_pieces(inputs, separator, text_field), enc,
                                              threads=min(8, os.cpu_count() or 1)):
            writer.add(tokens)
            docs += started
            if progress and (now := time.monotonic()) - last_report >= 1.0:
                last_report = now
                rate = writer.total / (now - start)
                print(f"tokenize_text: {writer.total:,} tokens, {docs:,} documents, {rate / 1e6:.2f}M tokens/s",
                      file=sys.stderr, flush=True)
        writer.finish()
        if writer.total <= val_tokens + 1:
            hint = (f"pass a smaller --val_tokens (e.g. {writer.total // 10})" if writer.total >= 20 else
                    "add more text (a few hundred tokens at least)")
            raise TokenizeError(f"the input has only {writer.total:,} tokens ({docs:,} documents), but "
                                f"--val_tokens is {val_tokens:,} (+1 target token), leaving nothing for training; "
                                f"{hint}")
        return writer.commit(replace=old), docs
    finally:
        writer.discard()


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unescape(text: str) -> str:
    # "\n\n\n" typed in a shell arrives as backslashes; the latin-1/backslashreplace round trip keeps non-ASCII intact.
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".txt, .jsonl or .jsonl.gz files")
    parser.add_argument("--out_dir", type=Path, required=True, help="directory for the shards (created if missing)")
    parser.add_argument("--name", help="shard file prefix (default: first input's name without .txt/.jsonl/.gz)")
    parser.add_argument("--val_tokens", type=_positive_int, default=10_485_760,
                        help="tokens in the val shard, taken from the start of the stream (default 10,485,760)")
    parser.add_argument("--shard_size", type=_positive_int, default=100_000_000,
                        help="tokens per train shard (default 100,000,000)")
    parser.add_argument("--separator", type=_unescape,
                        help=r'split .txt files into documents on this string, e.g. "\n\n\n" (backslash escapes '
                             "are interpreted; the separator itself is dropped); default: one document per file")
    parser.add_argument("--text_field", default="text", help="JSON field holding the document (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing NAME_val/train shards")
    args = parser.parse_args(argv)
    if args.separator == "":
        parser.error("--separator must not be empty")
    try:
        shards, docs = tokenize(args.inputs, args.out_dir, args.name, args.val_tokens, args.shard_size,
                                args.separator, args.text_field, args.overwrite)
    except TokenizeError as e:
        sys.exit(f"tokenize_text: error: {e}")
    width = max(len(str(path)) for path, _ in shards)
    print(f"wrote {len(shards)} shards, {sum(n for _, n in shards):,} tokens from {docs:,} documents:")
    for path, count in shards:
        print(f"  {str(path):<{width}}  {count:>13,} tokens")
    name = args.name or default_name(args.inputs[0])
    train, val = (shlex.quote(str(args.out_dir / f"{name}_{kind}_*.bin")) for kind in ("train", "val"))
    print(f"train on them with:\n  python train_gpt.py --preset=smoke --train_files={train} --val_files={val}")


if __name__ == "__main__":
    main()
