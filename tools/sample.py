"""Generate text from a train_gpt.py checkpoint: greedy, temperature / top-k / top-p sampling, or beam search.

    python tools/sample.py --checkpoint records/.../<uuid>_final.pt --prompt "The meaning of life is" \
        [--max_new_tokens 100] [--temperature 0.8] [--top_k 50] [--top_p 0.95] [--beams 4 --length_penalty 1.0]
        [--greedy] [--seed 0] [--device cpu|cuda] [--window_blocks N]

Generation uses train_gpt.KVCache, so each new token costs one token's forward (not the whole prefix); attention
masks follow training semantics (documents split at end-of-text, sliding window of the checkpoint's final long/short
sizes unless --window_blocks). The prompt is preceded by end-of-text, as every training document is. Generation
stops at end-of-text or after --max_new_tokens.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def load_model(path: str, device: str = "cpu") -> tg.GPT:
    ckpt = tg.load_checkpoint(path)
    args = tg.checkpoint_args(ckpt)
    for name in ("kron_impl", "ks_impl"):  # the CPU runs the torch/bmm paths of the same weights
        if device == "cpu" and getattr(args, name) == "triton":
            setattr(args, name, "auto")
    model = tg.build_model(args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


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


@torch.no_grad()
def generate(model: tg.GPT, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, window_blocks: int | None = None, generator: torch.Generator | None = None,
             stop_at_eot: bool = True) -> list[int]:
    """Tokens after the prompt. temperature 0 = greedy."""
    device = model.embed.weight.device
    cache, out = tg.KVCache(), []
    tokens = torch.tensor(prompt, device=device)
    for _ in range(max_new_tokens):
        logits = model.logits(model.hidden(tokens, window_blocks, cache=cache))[-1][:model.vocab_size]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        out.append(nxt)
        if stop_at_eot and nxt == tg.EOT_TOKEN:
            break
        tokens = torch.tensor([nxt], device=device)
    return out


@torch.no_grad()
def beam_search(model: tg.GPT, prompt: list[int], max_new_tokens: int, beams: int = 4, length_penalty: float = 1.0,
                window_blocks: int | None = None) -> list[tuple[float, list[int]]]:
    """(score, tokens) of the finished hypotheses, best first; score = sum of log-probs / length ** length_penalty.
    Each beam keeps its own KV cache (clones share the cached prefix tensors)."""
    device = model.embed.weight.device
    cache = tg.KVCache()
    logp = model.logits(model.hidden(torch.tensor(prompt, device=device), window_blocks, cache=cache))[-1]
    logp = logp[:model.vocab_size].float().log_softmax(-1)
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
                lp = model.logits(model.hidden(torch.tensor(toks[-1:], device=device), window_blocks, cache=c))[-1]
                alive.append((total, toks, c, lp[:model.vocab_size].float().log_softmax(-1)))
            if len(alive) == beams:
                break
        if not alive or len(finished) >= beams:
            break
    return sorted(finished, key=lambda t: -t[0])[:beams]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--beams", type=int, default=0, help="beam search with this many beams (0 = sampling)")
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--window_blocks", type=int, default=None, help="long window in 128-token blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    model = load_model(a.checkpoint, a.device)
    prompt = [tg.EOT_TOKEN] + enc.encode_ordinary(a.prompt)
    t = time.perf_counter()
    if a.beams:
        results = beam_search(model, prompt, a.max_new_tokens, a.beams, a.length_penalty, a.window_blocks)
        for score, toks in results:
            print(f"[{score:.3f}] {a.prompt}{enc.decode([x for x in toks if x != tg.EOT_TOKEN])}")
        tokens = results[0][1]
    else:
        gen = torch.Generator().manual_seed(a.seed)
        tokens = generate(model, prompt, a.max_new_tokens, 0.0 if a.greedy else a.temperature, a.top_k, a.top_p,
                          a.window_blocks, gen)
        print(a.prompt + enc.decode([x for x in tokens if x != tg.EOT_TOKEN]))
    seconds = time.perf_counter() - t
    result = dict(tokens=len(tokens), seconds=round(seconds, 3), tokens_per_s=round(len(tokens) / seconds, 1),
                  device=a.device, beams=a.beams)
    print(f"sample: {json.dumps(result)}")
    return result


if __name__ == "__main__":
    main()
