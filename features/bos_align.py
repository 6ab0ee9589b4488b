"""Document-aligned batches (--bos_align; frontier recipe section 1.1): every training sequence starts at a
document start (an EOT token), documents capped at the stage's doc_cap (--stages) or not at all; validation stays
the contiguous stream. Its sockets: the training batches in place of the core's contiguous ones, and their check of
the shards (enough tokens and documents). Cost: the shards' EOT positions in memory, one shard at a time; tokens a
cap or a sequence's end cuts are skipped (the run reads more of the stream than steps x batch tokens).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train_gpt import (EOT_TOKEN, HEADER_BYTES, Hyperparameters, find_shards, load_data_shard, read_shard_header,
                       stage_at, tokens_after, total_steps, training_stages)


@dataclass
class Flags:
    # document-aligned batches (features/bos_align.py; frontier recipe 1.1)
    bos_align: bool = False  # each sequence starts at a document start (EOT); documents capped at the stage's cap


def on(args: Hyperparameters) -> bool:
    return args.bos_align


def check(args: Hyperparameters, fail):
    if args.stages and not args.bos_align:
        fail("--stages needs --bos_align=true (the staged loader builds document-aligned sequences)")


def train_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device, start_step: int = 0):
    require_train_data(find_shards(args.train_files, "train"), args)  # now, not at the first batch
    return aligned_train_batches(args, rank, world_size, device, start_step)


def require_train_data(files: list[Path], args: Hyperparameters) -> list[Path]:
    """A lower bound on the tokens (capped and cut documents skip tokens, found when the stream runs out), and one
    document per sequence."""
    needed = tokens_after(total_steps(args), args) + total_steps(args) * args.micro_batches
    available = sum(read_shard_header(f) for f in files)
    if available < needed:
        raise SystemExit(f"error: {args.train_files!r} holds {available:,} tokens but the run needs at least "
                         f"{needed:,}; download more shards (python data/cached_fineweb10B.py N, 100M tokens "
                         f"each) or lower --num_iterations")
    require_documents(files, total_steps(args) * args.micro_batches, args.train_files)
    return files


def require_documents(files: list[Path], sequences: int, train_files: str):
    """--bos_align starts every sequence at a new document, so the shards need at least one document (EOT) per
    sequence of the run. Counted shard by shard until there are enough (the first FineWeb shard has ~100k)."""
    documents = 0
    for path in files:
        read_shard_header(path)
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES)
        documents += int(np.count_nonzero(tokens == EOT_TOKEN))
        if documents >= sequences:
            return
    raise SystemExit(f"error: {train_files!r} holds {documents:,} documents (EOT tokens) but --bos_align starts each "
                     f"of the run's {sequences:,} sequences (steps x micro_batches) at a new one; train on a corpus of "
                     f"many documents (FineWeb, or data/tokenize_text.py on a .jsonl with one per line), lower "
                     f"--num_iterations, or pass --bos_align=false")


class DocumentStream:
    """The training shards as documents in order, one shard in memory. A document starts at an EOT token and ends
    before the next one (or at its shard's end); a shard's tokens before its first EOT are skipped."""

    def __init__(self, files: list[Path]):
        self.files = iter(files)
        self.tokens, self.starts, self.ends, self.next_doc = None, [], [], 0

    def _load_next_shard(self):
        path = next(self.files, None)
        if path is None:
            raise RuntimeError("the training shards ran out of documents; download more shards (python "
                               "data/cached_fineweb10B.py N) or lower --num_iterations")
        self.tokens = load_data_shard(path).numpy()
        self.starts = np.flatnonzero(self.tokens == EOT_TOKEN)
        self.ends = np.append(self.starts[1:], len(self.tokens))
        self.next_doc = 0

    def sequence(self, length: int, doc_cap: int, build: bool = True) -> np.ndarray | None:
        """The next `length` tokens as whole documents from the next unused document start, each cut to doc_cap
        tokens; the last one is cut to what is still needed and its rest skipped (the next sequence starts at the
        next document). build=False only advances (another rank's sequence)."""
        pieces, need = [], length
        while need:
            while self.next_doc == len(self.starts):
                self._load_next_shard()
            start, end = self.starts[self.next_doc], self.ends[self.next_doc]
            self.next_doc += 1
            n = min(end - start, doc_cap, need)
            if build:
                pieces.append(self.tokens[start:start + n])
            need -= n
        return np.concatenate(pieces) if build else None


def aligned_train_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device,
                          start_step: int = 0):
    """--bos_align (frontier recipe section 1.1): every sequence starts at a document start; each step makes the
    global batch's micro_batches sequences in stream order (stage length + 1 tokens, documents capped at the stage's
    doc_cap) and rank r keeps sequences r * accum .. (r + 1) * accum - 1, so the math is the same on any number of
    ranks. Resuming replays the stream's document boundaries up to start_step without building the sequences."""
    stream = DocumentStream(find_shards(args.train_files, "train"))
    stages, accum = training_stages(args), args.micro_batches // world_size
    for step in range(total_steps(args)):
        stage = stage_at(step, stages) if stages else None
        length, cap = (stage.seq_len, stage.doc_cap) if stage else (args.seq_len, args.seq_len + 1)
        mine = range(rank * accum, (rank + 1) * accum) if step >= start_step else range(0)
        sequences = [stream.sequence(length + 1, cap, build=i in mine) for i in range(args.micro_batches)]
        if step < start_step:
            continue
        batch = []
        for tokens in (sequences[i] for i in mine):
            buf = torch.from_numpy(tokens.astype(np.int64))
            buf = buf.pin_memory() if device.type == "cuda" else buf
            batch.append((buf[:-1].to(device=device, dtype=torch.int32, non_blocking=True),
                          buf[1:].to(device=device, non_blocking=True)))
        yield batch
