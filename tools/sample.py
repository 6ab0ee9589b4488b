"""Generate text from a train_gpt.py checkpoint: greedy, temperature / top-k / top-p sampling, or beam search, for
one prompt or a file of prompts decoded as one padded batch.

    python tools/sample.py --checkpoint records/.../<uuid>_final.pt --prompt "The meaning of life is" \
        [--max_new_tokens 100] [--temperature 0.8] [--top_k 50] [--top_p 0.95] [--beams 4 --length_penalty 1.0]
        [--repetition_penalty 1.2] [--greedy] [--seed 0] [--device cpu|cuda] [--window_blocks N]
    python tools/sample.py --checkpoint <...>.pt --prompts_file prompts.txt [--batch_size 16] --greedy

Generation uses a KV cache, so each new token costs one token's forward (not the whole prefix); attention masks
follow training semantics (documents split at end-of-text, sliding window of the checkpoint's final long/short
sizes unless --window_blocks). Each prompt is preceded by end-of-text, as every training document is. Generation
stops at end-of-text or after --max_new_tokens.

--prompts_file (one prompt per line, blank lines skipped) decodes up to --batch_size prompts at once: each prompt
is prefilled alone, then every step runs one forward for all rows (BatchKVCache); greedy output per prompt is the
same as decoding it alone. With --beams the prompts run one after another.

--repetition_penalty p (CTRL, as in other generation libraries): before choosing, the logit of every token already in
the context (the prompt, its leading end-of-text included, and the tokens generated so far; per beam in beam
search) is divided by p if positive and multiplied by p if negative. p > 1 discourages repeats; 1 is off.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def load_model(path: str, device: str = "cpu") -> tg.GPT:
    ckpt = tg.load_checkpoint(path)
    args = tg.checkpoint_model_args(ckpt)
    for name in ("kron_impl", "ks_impl"):  # the CPU runs the torch/bmm paths of the same weights
        if device == "cpu" and getattr(args, name) == "triton":
            setattr(args, name, "auto")
    model = tg.build_model(args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# -----------------------------------------------------------------------------------------------------------------
# Choosing the next token


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k largest and the smallest set whose probability reaches top_p; others get -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the set already reached top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen, penalty: float) -> torch.Tensor:
    """logits (vocab,) with each token id in `seen` divided by penalty where positive, multiplied where negative
    (so the token always becomes less likely for penalty > 1). Returns a new tensor; penalty 1 returns logits."""
    if penalty == 1.0:
        return logits
    ids = torch.tensor(sorted({t for t in seen if t < logits.numel()}), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    return logits.index_copy(0, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def next_token(logits: torch.Tensor, seen, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
               generator: torch.Generator | None) -> int:
    """temperature 0 = greedy."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: tg.GPT, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, window_blocks: int | None = None, generator: torch.Generator | None = None,
             stop_at_eot: bool = True, repetition_penalty: float = 1.0) -> list[int]:
    """Tokens after the prompt."""
    device = model.embed.weight.device
    cache, out = tg.KVCache(), []
    tokens = torch.tensor(prompt, device=device)
    for _ in range(max_new_tokens):
        logits = model.logits(model.hidden(tokens, window_blocks, cache=cache))[-1][:model.vocab_size]
        nxt = next_token(logits, prompt + out, temperature, top_k, top_p, repetition_penalty, generator)
        out.append(nxt)
        if stop_at_eot and nxt == tg.EOT_TOKEN:
            break
        tokens = torch.tensor([nxt], device=device)
    return out


@torch.no_grad()
def beam_search(model: tg.GPT, prompt: list[int], max_new_tokens: int, beams: int = 4, length_penalty: float = 1.0,
                window_blocks: int | None = None, repetition_penalty: float = 1.0) -> list[tuple[float, list[int]]]:
    """(score, tokens) of the finished hypotheses, best first; score = sum of log-probs / length ** length_penalty,
    the log-probs taken after the repetition penalty of each beam's own context. Each beam keeps its own KV cache
    (clones share the cached prefix tensors)."""
    device = model.embed.weight.device

    def log_probs(hidden, context):
        logits = model.logits(hidden)[-1][:model.vocab_size].float()
        return apply_repetition_penalty(logits, context, repetition_penalty).log_softmax(-1)

    cache = tg.KVCache()
    logp = log_probs(model.hidden(torch.tensor(prompt, device=device), window_blocks, cache=cache), prompt)
    alive = [(0.0, [], cache, logp)]  # (sum log-prob, tokens, cache after the tokens, next-token log-probs)
    finished = []
    for step in range(max_new_tokens):
        candidates = []
        for total, toks, c, lp in alive:
            values, idx = lp.topk(beams)
            candidates += [(total + v.item(), toks + [i.item()], c) for v, i in zip(values, idx)]
        candidates.sort(key=lambda t: -t[0])
        alive = []
        for total, toks, c in candidates:
            if toks[-1] == tg.EOT_TOKEN or step == max_new_tokens - 1:
                finished.append((total / len(toks) ** length_penalty, toks))
            else:
                c = c.clone()
                hidden = model.hidden(torch.tensor(toks[-1:], device=device), window_blocks, cache=c)
                alive.append((total, toks, c, log_probs(hidden, prompt + toks)))
            if len(alive) == beams:
                break
        if not alive or len(finished) >= beams:
            break
    return sorted(finished, key=lambda t: -t[0])[:beams]


# -----------------------------------------------------------------------------------------------------------------
# Padded batches


class BatchWindow(tg.KVCacheWindow):
    """What GPT.hidden passes to each attention layer in place of a mask when decoding with a BatchKVCache: the
    rotary offset of the current call and the attention itself (train_gpt.attend hands q, k, v to it)."""

    @property
    def offset(self) -> int:
        return self.cache.rotary_offset

    def attend(self, q, k, v, scale):
        return self.cache.attend(q, k, v, scale, self.window_blocks, self.unit)


class BatchKVCache:
    """KV cache of several prompts (rows) decoded together.

    GPT.hidden runs one sequence, so a batch step is a 1-D call holding one token per row; attend() regroups that
    call's q, k, v as (rows, heads, 1, dim) and each row attends to its own slots only: a per-row mask of valid
    (non-padding) slots in the query's document, inside the sliding window measured in the row's own positions
    (train_gpt.doc_causal_window_mask, per row). Each prompt is first prefilled alone (start_row(b), then a
    GPT.hidden call with its tokens); stack() then left-pads the rows' keys and values to a common length.

    Rotary positions: the model gives token j of a call position offset + j, so row b of a batch step sits at the
    step's offset + b. Prefilling row b at offset shift_b = base + b - len_b makes every row's rotary positions its
    real positions + shift_b, in the prefill and in every step; attention scores depend only on position
    differences within a row, so they are the ones of decoding that prompt alone. Every other model part must act
    on each token alone (true of all but --mot, which generate_batch refuses).
    """

    def __init__(self, prompt_lengths: list[int]):
        self.lengths = list(prompt_lengths)
        base = max(n - b for b, n in enumerate(self.lengths))  # the smallest base with every shift >= 0
        self.shifts = [base + b - n for b, n in enumerate(self.lengths)]
        self.step_offset = base  # rotary offset of the next batch step
        self.row, self.layer, self.rotary_offset = None, 0, 0
        self.row_keys = [[] for _ in self.lengths]  # per row, per attention layer: (1, kv_heads, len, dim)
        self.row_values = [[] for _ in self.lengths]
        self.row_docs = [None] * len(self.lengths)
        self.keys = self.values = None  # after stack(): per attention layer (rows, kv_heads, slots, dim)
        self.valid = self.pos = self.docs = None  # (rows, slots): real slot, its position and document in its row

    def max_rotary_position(self, steps: int) -> int:
        """An upper bound of the rotary positions that decoding `steps` new tokens reaches."""
        return self.step_offset + len(self.lengths) - 1 + max(steps - 1, 0)

    def start_row(self, b: int):
        if self.keys is not None:
            raise RuntimeError("every row must be prefilled before stack()")
        self.row = b

    def begin(self, inputs: torch.Tensor, window_blocks, unit: str = "block") -> dict:
        self.layer = 0
        if self.row is not None:
            if len(inputs) != self.lengths[self.row]:
                raise ValueError(f"row {self.row} was declared with {self.lengths[self.row]} tokens, got "
                                 f"{len(inputs)}")
            self.rotary_offset = self.shifts[self.row]
            self.row_docs[self.row] = tg.document_ids(inputs)
        else:
            if self.keys is None or len(inputs) != len(self.lengths):
                raise ValueError(f"a batch step takes one token per row ({len(self.lengths)}) after stack(), got "
                                 f"{len(inputs)} tokens")
            self.rotary_offset = self.step_offset
            # an end-of-text token starts a new document, as in training
            docs = self.docs[:, -1] + (inputs == tg.EOT_TOKEN).to(self.docs.dtype)
            self.valid = torch.cat([self.valid, self.valid.new_ones(len(inputs), 1)], dim=1)
            self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)
            self.docs = torch.cat([self.docs, docs[:, None]], dim=1)
        return {"L": BatchWindow(self, max(int(window_blocks), 1), unit),
                "S": BatchWindow(self, max(int(window_blocks) // 2, 1), unit)}

    def end(self):
        if self.row is None:
            self.step_offset += 1
        self.row = None

    def stack(self):
        """Left-pad the prefilled rows to the longest prompt: slot j of row b holds position j - (slots - len_b)."""
        if any(d is None for d in self.row_docs):
            raise RuntimeError(f"rows {[b for b, d in enumerate(self.row_docs) if d is None]} were never prefilled")
        slots = max(self.lengths)
        pads = [slots - n for n in self.lengths]
        self.keys = [torch.cat([F.pad(rk[i], (0, 0, p, 0)) for rk, p in zip(self.row_keys, pads)])
                     for i in range(len(self.row_keys[0]))]
        self.values = [torch.cat([F.pad(rv[i], (0, 0, p, 0)) for rv, p in zip(self.row_values, pads)])
                       for i in range(len(self.row_values[0]))]
        self.row_keys = self.row_values = None
        device = self.row_docs[0].device
        slot = torch.arange(slots, device=device)[None, :]
        first = torch.tensor(pads, device=device)[:, None]
        self.valid = slot >= first
        self.pos = (slot - first).clamp_min(0)
        self.docs = torch.stack([F.pad(d, (p, 0)) for d, p in zip(self.row_docs, pads)])

    def attend(self, q, k, v, scale, window_blocks, unit: str = "block"):
        """q (1, heads, T, dq), k (1, kv_heads, T, dq), v (1, kv_heads, T, dv): one row's prompt (prefill) or one
        token per row (batch step); unit: the model's --window_unit."""
        i, gqa = self.layer, k.size(1) != q.size(1)
        self.layer += 1
        if self.row is not None:
            self.row_keys[self.row].append(k)
            self.row_values[self.row].append(v)
            idx = torch.arange(q.size(2), device=q.device)
            mask_mod = tg.doc_causal_window_mask(self.row_docs[self.row], window_blocks, unit=unit)
            mask = mask_mod(0, 0, idx[:, None], idx[None, :])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        # (1, heads, rows, dim) -> (rows, heads, 1, dim): each row's new token is its own query
        self.keys[i] = torch.cat([self.keys[i], k.transpose(0, 2)], dim=2)
        self.values[i] = torch.cat([self.values[i], v.transpose(0, 2)], dim=2)
        query_pos, query_doc = self.pos[:, -1:], self.docs[:, -1:]
        # doc_causal_window_mask of each row, its queries at the row's last position
        mask = (self.valid & (self.docs == query_doc) & (self.pos <= query_pos)
                & tg.WINDOW_RULES[unit](query_pos, self.pos, window_blocks, 0))
        y = F.scaled_dot_product_attention(q.transpose(0, 2), self.keys[i], self.values[i],
                                           attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=gqa)
        return y.transpose(0, 2)


def rotary_length(model: tg.GPT) -> int | None:
    """Positions the model's rotary tables cover (None without rotary layers)."""
    lengths = [m.max_seq_len for m in model.modules() if isinstance(m, tg.Rotary)]
    return min(lengths) if lengths else None


@torch.no_grad()
def generate_batch(model: tg.GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, window_blocks: int | None = None,
                   generator: torch.Generator | None = None, stop_at_eot: bool = True,
                   repetition_penalty: float = 1.0) -> list[list[int]]:
    """generate() for several prompts at once: tokens after each prompt, in prompt order. Each prompt is prefilled
    alone, then one forward per step serves every row; a row that ended feeds end-of-text (a new document that
    sees only itself) until all rows end. Sampling draws the rows in order from one generator."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch needs at least one prompt, each with at least one token")
    if not isinstance(model.mot, tg.PassThrough):  # --mot installed its byte cross-attention
        raise ValueError("--mot models mix the bytes of neighbouring tokens of one call, which in a batch step "
                         "belong to different prompts; decode them one prompt at a time (--prompt)")
    device = model.embed.weight.device
    cache = BatchKVCache([len(p) for p in prompts])
    limit = rotary_length(model)
    if limit is not None and cache.max_rotary_position(max_new_tokens) >= limit:
        raise ValueError(f"{len(prompts)} prompts of up to {max(map(len, prompts))} tokens plus {max_new_tokens} new "
                         f"tokens need rotary position {cache.max_rotary_position(max_new_tokens)}, but the model "
                         f"has {limit}; lower --max_new_tokens or --batch_size")
    last = []
    for b, prompt in enumerate(prompts):
        cache.start_row(b)
        last.append(model.logits(model.hidden(torch.tensor(prompt, device=device), window_blocks, cache=cache))[-1])
    cache.stack()
    logits = torch.stack(last)[:, :model.vocab_size]
    outs, done = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        for b, prompt in enumerate(prompts):
            if done[b]:
                continue
            outs[b].append(next_token(logits[b], prompt + outs[b], temperature, top_k, top_p, repetition_penalty,
                                      generator))
            done[b] = stop_at_eot and outs[b][-1] == tg.EOT_TOKEN
        if all(done) or step == max_new_tokens - 1:
            break
        tokens = torch.tensor([tg.EOT_TOKEN if d else out[-1] for out, d in zip(outs, done)], device=device)
        logits = model.logits(model.hidden(tokens, window_blocks, cache=cache))[:, :model.vocab_size]
    return outs


# -----------------------------------------------------------------------------------------------------------------
# Command line


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of path; ValueError naming the problem otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"--prompts_file {path}: {e.strerror}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path} holds no prompt (one per line; blank lines are skipped)")
    return prompts


def flag_problem(a) -> str | None:
    """What is wrong with the parsed flags (one line naming the flag), or None."""
    finite = math.isfinite
    if not (finite(a.temperature) and a.temperature >= 0):
        return f"--temperature must be >= 0 (0 = greedy) and finite, got {a.temperature}"
    if not (finite(a.top_p) and 0 < a.top_p <= 1):
        return f"--top_p must be in (0, 1] (1 = off), got {a.top_p}"
    if a.top_k < 0:
        return f"--top_k must be >= 0 (0 = off), got {a.top_k}"
    if not (finite(a.repetition_penalty) and a.repetition_penalty > 0):
        return (f"--repetition_penalty must be > 0 (1 = off, > 1 discourages repeats) and finite, got "
                f"{a.repetition_penalty}")
    if a.max_new_tokens < 1:
        return f"--max_new_tokens must be >= 1, got {a.max_new_tokens}"
    if a.beams < 0:
        return f"--beams must be >= 0 (0 = sampling, N = beam search with N beams), got {a.beams}"
    if not finite(a.length_penalty):
        return f"--length_penalty must be finite (scores are divided by length ** it), got {a.length_penalty}"
    if a.batch_size < 1:
        return f"--batch_size must be >= 1, got {a.batch_size}"
    if a.window_blocks is not None and a.window_blocks < 1:
        return f"--window_blocks must be >= 1 (128-token blocks), got {a.window_blocks}"
    try:
        device = torch.device(a.device)
    except RuntimeError:
        return f"--device must be cpu or cuda (cuda:N), got {a.device!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {a.device}: this machine has no CUDA device; use --device cpu"
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="")
    source.add_argument("--prompts_file", help="one prompt per line, decoded as padded batches")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per padded batch with --prompts_file")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages tokens already in the "
                   "context (CTRL: positive logits divided, negative multiplied); 1 = off")
    p.add_argument("--beams", type=int, default=0, help="beam search with this many beams (0 = sampling)")
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--window_blocks", type=int, default=None, help="long window in 128-token blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    # Every flag is checked before the tokenizer and the checkpoint load: a bad value costs no wait, and NaN (which
    # passes any < or > test) is caught by the isfinite checks.
    if problem := flag_problem(a):
        p.error(problem)
    try:
        texts = read_prompts(a.prompts_file) if a.prompts_file else [a.prompt]
    except ValueError as e:
        p.error(str(e))
    if not Path(a.checkpoint).is_file():
        p.error(f"--checkpoint {a.checkpoint}: no such file (runs write <record>_final.pt and <record>_stepN.pt "
                "beside their record)")
    enc = tg.gpt2_encoding()  # "error: ..." in one line when it cannot load (offline without a cache)
    model = load_model(a.checkpoint, a.device)  # "error: ..." in one line for an unreadable checkpoint
    prompts = [[tg.EOT_TOKEN] + enc.encode_ordinary(text) for text in texts]
    temperature = 0.0 if a.greedy else a.temperature
    gen = torch.Generator().manual_seed(a.seed)

    def show(text, tokens):
        return text + enc.decode([x for x in tokens if x != tg.EOT_TOKEN])

    t = time.perf_counter()
    outputs = []
    if a.beams:
        for text, prompt in zip(texts, prompts):
            results = beam_search(model, prompt, a.max_new_tokens, a.beams, a.length_penalty, a.window_blocks,
                                  a.repetition_penalty)
            for score, toks in results:
                print(f"[{score:.3f}] {show(text, toks)}")
            outputs.append(results[0][1])
    elif a.prompts_file:
        for i in range(0, len(prompts), a.batch_size):
            try:
                batch = generate_batch(model, prompts[i:i + a.batch_size], a.max_new_tokens, temperature, a.top_k,
                                       a.top_p, a.window_blocks, gen, repetition_penalty=a.repetition_penalty)
            except ValueError as e:
                p.error(str(e))
            for text, toks in zip(texts[i:i + a.batch_size], batch):
                print(show(text, toks))
            outputs += batch
    else:
        outputs.append(generate(model, prompts[0], a.max_new_tokens, temperature, a.top_k, a.top_p, a.window_blocks,
                                gen, repetition_penalty=a.repetition_penalty))
        print(show(texts[0], outputs[0]))
    seconds = time.perf_counter() - t
    n = sum(map(len, outputs))
    result = dict(tokens=n, prompts=len(prompts), seconds=round(seconds, 3), tokens_per_s=round(n / seconds, 1),
                  device=a.device, beams=a.beams, batch_size=a.batch_size if a.prompts_file else 1)
    print(f"sample: {json.dumps(result)}")
    return result


if __name__ == "__main__":
    main()
