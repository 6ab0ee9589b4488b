"""Mixture of tokenizers (--mot): each token also attends over its own UTF-8 bytes.

Its x0 socket: GPT.hidden passes the token embedding through model.mot, which install() makes a CharCrossAttention
(the core's is a PassThrough). Its parameters: the byte and slot embeddings train with the embeddings, its matrices
with the head (Adam), its mixing scalars with the scalars. Cost: describe_model's "mot" lines (model_parts).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import train_gpt  # train_gpt.attend at call time: tools/memory_plan.py stands a FlexAttention in for it
from train_gpt import (BLOCK_SIZE, EOT_TOKEN, GPT2_VOCAB, HERE, CastedLinear, Hyperparameters, ModelPart,
                       count_params, document_ids, gpt2_encoding, mask_builder, norm)

BYTE_PAD, BYTE_EOT, BYTE_VOCAB = 256, 257, 258  # byte ids: 0..255 are the bytes themselves


@dataclass
class Flags:
    # mixture of tokenizers: each token also attends over its own UTF-8 bytes (features/mot.py)
    mot: str = "off"  # off | cross (per-token cross-attention over its bytes) | cross+self (bytes self-attend first)
    bytes_per_token: int = 16  # byte slots per token: the token's last bytes, right-aligned, PAD on the left
    char_dim: int = 128  # width of the byte embeddings and of the per-token cross-attention (0 = model_dim, no q/proj)
    mot_heads: int = 4  # cross-attention heads (head dim = char_dim / mot_heads)
    mot_pull_left: bool = False  # fill a token's PAD slots with the trailing bytes of earlier tokens of its document
    mot_self_window: int = 64  # cross+self: causal byte self-attention window in tokens (x bytes_per_token, to 128s)
    mot_self_pool: int = 1  # cross+self: K bytes summed (per-slot learned scales) per self-attention position


MIN_VALUES = dict(bytes_per_token=1, char_dim=0, mot_heads=1, mot_self_window=1, mot_self_pool=1)
NEEDS = dict(
    bytes_per_token=("--mot other than off", lambda a: a.mot != "off"),
    char_dim=("--mot other than off", lambda a: a.mot != "off"),
    mot_heads=("--mot other than off", lambda a: a.mot != "off"),
    mot_pull_left=("--mot other than off", lambda a: a.mot != "off"),
    mot_self_window=("--mot=cross+self", lambda a: a.mot == "cross+self"),
    mot_self_pool=("--mot=cross+self", lambda a: a.mot == "cross+self"),
)


def on(args: Hyperparameters) -> bool:
    return args.mot != "off"


def check(args: Hyperparameters, fail):
    if args.mot not in ("off", "cross", "cross+self"):
        fail(f"--mot={args.mot!r}; valid values: off, cross, cross+self")
    if args.mot == "off":
        return
    if args.bytes_per_token < 1:
        fail(f"--bytes_per_token={args.bytes_per_token} must be >= 1")
    if args.mot_heads < 1 or char_width(args) % args.mot_heads:
        fail(f"--char_dim={args.char_dim} (byte width {char_width(args)}; 0 = model_dim) must be a positive "
             f"multiple of --mot_heads={args.mot_heads}")
    if args.vocab_size > GPT2_VOCAB:
        fail(f"--mot needs GPT-2 token ids (the byte table has {GPT2_VOCAB} rows); vocab_size={args.vocab_size}")
    if args.mot == "cross+self":
        if args.mot_self_window < 1:
            fail(f"--mot_self_window={args.mot_self_window} must be >= 1 token")
        S, K = args.bytes_per_token, args.mot_self_pool
        if K < 1 or S % K:
            fail(f"--mot_self_pool={K} must divide --bytes_per_token={S} (a token's bytes pool in whole groups); "
                 f"valid values: {', '.join(str(k) for k in range(1, S + 1) if S % k == 0)}")
        longest = max(args.seq_len, args.val_seq_len) * args.bytes_per_token
        if longest >= 2 ** 31:
            fail(f"--mot=cross+self: byte stream of {longest:,} positions (seq_len x bytes_per_token) overflows "
                 f"int32 mask indices; lower seq_len/val_seq_len or bytes_per_token")






def byte_table(bytes_per_token: int) -> Tensor:
    """(GPT2_VOCAB, bytes_per_token) int16: row t holds token t's last bytes_per_token UTF-8 bytes right-aligned
    (the token's final byte in the last slot), BYTE_PAD before them; EOT_TOKEN is [PAD, ..., PAD, BYTE_EOT].
    Built from tiktoken once and cached under data/local/ (git-ignored). Integer on purpose: ids up to 257 do not
    survive a cast to bf16."""
    path = HERE / "data" / "local" / f"byte_table_gpt2_{bytes_per_token}.pt"
    if path.exists():
        return torch.load(path)
    enc = gpt2_encoding()  # only --mot needs it
    # on the CPU whatever the default device: a model built on the meta device (meta_model) must not cache an
    # empty table for the real one
    table = torch.full((GPT2_VOCAB, bytes_per_token), BYTE_PAD, dtype=torch.int16, device="cpu")
    for t in range(GPT2_VOCAB):
        piece = [BYTE_EOT] if t == EOT_TOKEN else list(enc.decode_single_token_bytes(t))[-bytes_per_token:]
        table[t, bytes_per_token - len(piece):] = torch.tensor(piece, dtype=torch.int16, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written table
    return table


def char_width(args: Hyperparameters) -> int:
    """Width of the --mot byte states: --char_dim, or model_dim at --char_dim=0."""
    return args.char_dim or args.model_dim


def token_bytes(inputs: Tensor, table: Tensor, pull_left: bool) -> Tensor:
    """(T, S) int64 byte ids seen by each token of one packed sequence: table[inputs], and with pull_left the PAD
    slots filled with the trailing bytes of tokens t-1, t-2, ... (up to S-1 back) of the same document, so row t
    is the last S bytes of its document up to and including token t. Never reads a later token or an earlier
    document (documents start at EOT, whose own byte belongs to the new document)."""
    own = table[inputs.long()].long()  # (T, S)
    if not pull_left:
        return own
    T, S = own.shape
    back = torch.arange(S - 1, -1, -1, device=inputs.device)  # lookback k for window column j (oldest first)
    src = torch.arange(T, device=inputs.device)[:, None] - back  # (T, S) source token index, k = S-1 .. 0
    docs = document_ids(inputs)
    ok = (src >= 0) & (docs[src.clamp_min(0)] == docs[:, None])  # same document, not before the sequence
    window = own[src.clamp_min(0)]  # (T, S tokens, S bytes): each lookback token's bytes, oldest token first
    valid = ok[:, :, None] & (window != BYTE_PAD)
    window, valid = window.flatten(1), valid.flatten(1)  # (T, S*S) bytes in stream order
    from_end = valid.flip(1).cumsum(1).flip(1)  # valid bytes at or after each position
    keep = valid & (from_end <= S)
    slot = torch.where(keep, S - from_end, S)  # column S is a discard column
    out = torch.full((T, S + 1), BYTE_PAD, dtype=torch.long, device=inputs.device)
    return out.scatter_(1, slot, torch.where(keep, window, BYTE_PAD))[:, :S]


class CharSelfAttention(nn.Module):
    """--mot=cross+self: one pre-norm self-attention layer over the byte stream of the sequence (T * S positions:
    token order, then slot order, PAD slots included as learned inputs), causal, documents split at EOT, sliding
    window of mot_self_window tokens in 128-position blocks: the same doc_causal_window_mask as the blocks (dense on
    CPU, BlockMask on GPU), built once per sequence. Output projection zero-initialized (starts as identity)."""

    def __init__(self, args: Hyperparameters, positions_per_token: int | None = None):
        super().__init__()
        C, S = char_width(args), positions_per_token or args.bytes_per_token
        self.heads, self.positions_per_token = args.mot_heads, S
        self.window_blocks = max(1, -(-args.mot_self_window * S // BLOCK_SIZE))
        self.qkv = CastedLinear(C, 3 * C)
        self.proj = CastedLinear(C, C, zero_init=True)

    def forward(self, chars: Tensor, inputs: Tensor) -> Tensor:  # chars (T, S, C), inputs (T,)
        return chars + self.attention(chars, inputs)

    def attention(self, chars: Tensor, inputs: Tensor) -> Tensor:  # chars (T, S, C) -> the residual branch (T, S, C)
        T, S, C = chars.shape
        if T * S >= 2 ** 31:
            raise ValueError(f"--mot=cross+self: {T} tokens x {S} byte positions = {T * S:,} overflow int32 masks")
        # (T * S,) = document_ids(inputs).repeat_interleave(S), computed as a scan over the byte stream (an EOT counts
        # at its first slot): inductor's CPU FlexAttention cannot lower a mask capturing a view of the token-level ids
        first_slot = torch.arange(T * S, device=inputs.device) % S == 0
        docs = ((inputs == EOT_TOKEN).repeat_interleave(S) & first_slot).cumsum(0)
        mask = mask_builder(chars)(docs, self.window_blocks, docs=docs)
        q, k, v = self.qkv(norm(chars.flatten(0, 1))).view(T * S, 3, self.heads, -1).permute(1, 2, 0, 3)[:, None]
        # v contiguous: inductor's CPU FlexAttention reads an in-graph view at storage offset 0 (v is qkv's third third)
        y = train_gpt.attend(norm(q), norm(k), v.contiguous(), mask, q.size(-1) ** -0.5)  # (1, heads, T * S, hd)
        return self.proj(y[0].transpose(0, 1).reshape(T, S, C))

    def flops_per_token(self, seq_len: int) -> int:
        """Matrices and scores of the positions_per_token positions of a token, each seeing every key of its
        window (documents only shorten it)."""
        S, C = self.positions_per_token, self.qkv.in_features
        context = min(seq_len * S, self.window_blocks * BLOCK_SIZE - BLOCK_SIZE // 2)
        return S * (2 * (self.qkv.weight.numel() + self.proj.weight.numel()) + 4 * context * C)


class PooledCharSelfAttention(CharSelfAttention):
    """--mot=cross+self --mot_self_pool=K > 1: the byte self-attention runs over T * S / K positions. A token's S
    byte states are taken K at a time in slot order, each scaled channel-wise by its slot's learned order vector,
    and summed: an added per-slot vector would cancel out of the sum (a + b = b + a), a per-slot scale keeps the
    byte order. The attention's output for a group is added back to each of its K bytes, so the cross-attention
    still sees every slot. Groups never span tokens (K divides S), so causality is the token's, as before; per
    token the score FLOPs fall K^2-fold (K x fewer positions, each over a K x shorter window), the matrices K-fold."""

    def __init__(self, args: Hyperparameters):
        K, C = args.mot_self_pool, char_width(args)
        super().__init__(args, positions_per_token=args.bytes_per_token // K)
        self.pool = K
        # (K * C,) flat so it trains with the per-channel scalars (Adam at scalar_lr); near 1, distinct per slot
        self.order = nn.Parameter(torch.empty(K * C).uniform_(0.5, 1.5))

    def forward(self, chars: Tensor, inputs: Tensor) -> Tensor:  # chars (T, S, C), inputs (T,)
        T, S, C = chars.shape
        K = self.pool
        pooled = (chars.view(T, S // K, K, C) * self.order.view(K, C).type_as(chars)).sum(2)  # (T, S / K, C)
        return chars + self.attention(pooled, inputs).repeat_interleave(K, dim=1)


class NoCharMixing(nn.Module):
    """--mot=cross: the byte embeddings go to the cross-attention unchanged."""

    def forward(self, chars: Tensor, inputs: Tensor) -> Tensor:
        return chars

    def flops_per_token(self, seq_len: int) -> int:
        return 0


def build_char_mixing(args: Hyperparameters) -> nn.Module:
    """What the byte states go through before the cross-attention: nothing (--mot=cross) or a causal self-attention
    over the byte stream (cross+self), on every byte or on pooled groups of --mot_self_pool bytes."""
    if args.mot != "cross+self":
        return NoCharMixing()
    return PooledCharSelfAttention(args) if args.mot_self_pool > 1 else CharSelfAttention(args)


class CharCrossAttention(nn.Module):
    """--mot=cross (and cross+self): each token attends over its own byte slots (token_bytes). Query: the RMS-normed
    token embedding projected to char_dim; keys/values: byte embedding + slot-position embedding (cross+self: after
    CharSelfAttention); QK RMS-norm; PAD slots masked (every row has at least one real byte). The output projection
    to model_dim is zero-initialized, so the model starts as the baseline; returns a * tok + b * chars with learned
    scalars a = b = 1 at init, which GPT.hidden then RMS-norms into x0. Per token: one (heads, 1, S) attention, a
    batched matmul over tokens. --char_dim=0: the bytes live in model_dim, the normed token embedding is the query
    and the attention output is added as is (no q, no proj); b starts at 0 instead, so step 0 is still the
    baseline (b's gradient is not zero, so it moves at once)."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        S, C, dim = args.bytes_per_token, char_width(args), args.model_dim
        model_width = args.char_dim == 0
        self.heads, self.pull_left = args.mot_heads, args.mot_pull_left
        self.register_buffer("byte_table", byte_table(S), persistent=False)  # moves with the model, not saved
        self.char_embed = nn.Embedding(BYTE_VOCAB, C)
        self.slot_embed = nn.Embedding(S, C)
        self.q = nn.Identity() if model_width else CastedLinear(dim, C)
        self.kv = CastedLinear(C, 2 * C)
        self.proj = nn.Identity() if model_width else CastedLinear(C, dim, zero_init=True)
        self.mix = nn.Parameter(torch.tensor([1.0, 0.0 if model_width else 1.0]))  # a (token), b (chars)
        self.char_mixing = build_char_mixing(args)

    def forward(self, tok: Tensor, inputs: Tensor) -> Tensor:  # tok (1, T, dim), inputs (T,)
        ids = token_bytes(inputs, self.byte_table, self.pull_left)  # (T, S)
        T, S = ids.shape
        chars = self.char_mixing(self.char_embed(ids) + self.slot_embed.weight, inputs)  # (T, S, C)
        q = self.q(norm(tok[0])).view(T, self.heads, 1, -1)
        k, v = self.kv(chars.type_as(q)).view(T, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (T, heads, S, hd)
        q, k = norm(q), norm(k)
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5  # (T, heads, 1, S)
        scores = scores.float().masked_fill((ids == BYTE_PAD)[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1).type_as(v) @ v).view(T, -1)  # (T, C)
        return self.mix[0] * tok + self.mix[1] * self.proj(out)[None]

    def flops_per_token(self, seq_len: int) -> int:
        """q and proj (none at --char_dim=0), keys/values of the S slots, the (1 x S) attention, the byte mixing."""
        S, C = self.slot_embed.num_embeddings, self.kv.in_features
        qproj = sum(2 * p.numel() for m in (self.q, self.proj) for p in m.parameters())
        return qproj + 2 * S * self.kv.weight.numel() + 4 * S * C + self.char_mixing.flops_per_token(seq_len)


def install(model: nn.Module, args: Hyperparameters):
    if on(args):
        model.mot = CharCrossAttention(args)


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """The byte and slot embeddings train as embeddings, the matrices (outside the blocks) with the head."""
    if not isinstance(model.mot, CharCrossAttention):
        return {}
    embeds = [m.weight for m in model.mot.modules() if isinstance(m, nn.Embedding)]
    return dict(embeds=embeds, head=[p for p in model.mot.parameters() if p.ndim >= 2
                                     and all(p is not e for e in embeds)])


def model_parts(model: nn.Module, args: Hyperparameters) -> list:
    if not isinstance(model.mot, CharCrossAttention):
        return []
    return [ModelPart(f"mot {type(model.mot).__name__}", count_params(model.mot), "mot",
                      model.mot.flops_per_token(model.eval_chunk_tokens))]
