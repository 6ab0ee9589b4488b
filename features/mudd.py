"""MUDD (frontier recipe 3.5, r81/r85; arXiv 2502.12170): per-token mixes of earlier residuals, m = F(z) =
0.1 (W2 GELU(W1 z) + b). Its j=1 mix before the final norm (--mudd_final_sources), its j=0 block
(--mudd_block: 14 mixes around the block's attention and MLP), and the MUDD gates (--mudd_gate_block) that give
per token the XSA alphas, the x0 / bigram / skip weights, the heads' output scales and DC's weights. Its sockets: the
block, the per-token gated modules of the core's roles (gated), install (the final mix and the gates, built after
the core model so its random draw is unchanged), Adam groups of its own, the record's bf16 parameters, and its
line in describe_model.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from features.dc import compose_heads
from features.xsa import remove_value_component
from train_gpt import (Hyperparameters, ModelPart, PassThrough, build_attention, build_mlp, count_params,
                       dense_flops_per_token, kv_heads, norm, parse_layer_list, parse_skip_pairs,
                       refuse_without_head_hooks, skip_connections, value_embed_dim, value_embed_tables)


@dataclass
class Flags:
    # MUDD (features/mudd.py; frontier recipe 3.5, r81): per-token mixes m = 0.1 (W2 GELU(W1 z) + b) of residuals
    mudd_final_sources: str = ""  # j=1 before the final norm: x += sum_k m_k s_k, s_k in "in,7:-0.5,9,ve0,3" ("" = off)
    mudd_block: int = -1  # the block running j=0 (14 per-token mixes around its attention and MLP; -1 = off)
    mudd_block_source: int = -1  # j=0's c: the earlier block whose output it mixes in and its attention reads
    mudd_lr: float = 0.002  # Adam LR of the MUDD mixes' W1, W2 ("mudd" group) and b ("mudd_bias" group)
    # MUDD gates (frontier recipe 3.5, r85): per-token G = s (W2 GELU(W1 z) + b) for XSA alphas, x0/bigram/skip weights
    mudd_gate_block: int = -1  # gates on (-1 = off): x0's gate for the blocks before it, its input's for the rest
    mudd_gate_attn_layers: str = ""  # blocks whose heads' outputs are scaled by a raw gate value (init 0.25; r85: 3,10)
    mudd_gate_lr: float = 8e-4  # Adam LR of the gates' W1, W2 ("mudd_gate") and b, s ("mudd_gate_bias")


MIN_VALUES = dict(mudd_lr=0.0, mudd_gate_lr=0.0)
NEEDS = dict(
    mudd_block_source=("--mudd_block >= 0", lambda a: a.mudd_block >= 0),
    mudd_lr=("--mudd_final_sources or --mudd_block", lambda a: bool(a.mudd_final_sources) or a.mudd_block >= 0),
    mudd_gate_lr=("--mudd_gate_block >= 0", lambda a: a.mudd_gate_block >= 0),
)
# W1, W2 ("mudd", "mudd_gate") and b ("mudd_bias"; with the gates' scale s "mudd_gate_bias": no weight decay)
ADAM_GROUPS = ("mudd", "mudd_bias", "mudd_gate", "mudd_gate_bias")
REQUIRES = ("dc", "xsa")  # the gated DC and XSA compute what theirs do, with per-token weights
RECORD_BF16_GROUPS = ADAM_GROUPS  # --param_dtype=record: the record stores W1, W2, b in bf16 (not the gates' s)


def on(args: Hyperparameters) -> bool:
    return bool(args.mudd_final_sources) or args.mudd_block >= 0 or args.mudd_gate_block >= 0


def check(args: Hyperparameters, fail):
    """--mudd_final_sources (j=1) and --mudd_block / --mudd_block_source (j=0): sources that exist, residual-wide
    values, and the inputs the j=0 block mixes (its attention, value embedding, bigram embedding); then the
    gates."""
    check_gates(args, fail)
    L, text = args.num_layers, args.mudd_final_sources
    try:
        sources = parse_mudd_sources(text)
    except ValueError:
        fail(f"--mudd_final_sources={text!r}: expected comma-separated sources, each 'in' (the residual entering "
             f"block 0), a block index N (its output) or 'veK' (value-embedding table K), optionally ':init' "
             f"(default 0), e.g. 'in,7:-0.5,9,ve0,3'")
    names = [name for name, _ in sources]
    if text.strip() and not sources:
        fail(f"--mudd_final_sources={text!r} lists no source (use '' for off)")
    bad = [n for n in names if isinstance(n, int) and not 0 <= n < L] + \
        [n for n in names if isinstance(n, str) and n != "in" and int(n[2:]) >= args.num_value_embeds]
    if bad:
        fail(f"--mudd_final_sources names {bad}: blocks must be in 0..{L - 1}, value-embedding tables in "
             f"0..{args.num_value_embeds - 1} (--num_value_embeds={args.num_value_embeds})")
    if len(set(names)) != len(names):
        fail(f"--mudd_final_sources={text!r} lists a source twice; give each source once (one weight each)")
    if not all(math.isfinite(init) for _, init in sources):
        fail(f"--mudd_final_sources={text!r}: the inits must be finite numbers")
    if any(isinstance(n, str) and n != "in" for n in names) and value_embed_dim(args) != args.model_dim:
        fail(f"--mudd_final_sources adds value embeddings to the residual; with --n_kv_heads={args.n_kv_heads} "
             f"they are {value_embed_dim(args)} wide, not model_dim={args.model_dim} (drop the veK sources)")
    if sources and args.backout_layer >= 0:
        fail(f"--mudd_final_sources generalizes --backout_layer={args.backout_layer}: list "
             f"'{args.backout_layer}:-0.5' among its sources and drop --backout_layer (-1)")
    k, c = args.mudd_block, args.mudd_block_source
    if not -1 <= k < L:
        fail(f"--mudd_block={k} must be a block in 0..{L - 1} (or -1: off)")
    if k < 0:
        return
    if not 0 <= c < k:
        fail(f"--mudd_block={k} needs --mudd_block_source in 0..{k - 1}: the earlier block whose output its "
             f"attention reads and its mixes add (recipe: 7 for block 10); got {c}")
    try:
        skipped_into = {dst for _, dst in parse_skip_pairs(args.attn_input_skips)}
    except ValueError:
        skipped_into = set()  # features/attn_input_skips.py's check says what is wrong with it
    if k in skipped_into:
        fail(f"--attn_input_skips names the --mudd_block={k} as a dst; its attention reads --mudd_block_source (the "
             f"recipe's r77 skips go into other blocks): drop that pair")
    if k in parse_layer_list(args.no_attn_layers):
        fail(f"--mudd_block={k} mixes into its attention's values; block {k} has none (--no_attn_layers)")
    if args.mla_kv_rank > 0 or kv_heads(args) != args.num_heads:
        fail(f"--mudd_block={k} adds model_dim-wide residuals to the attention's values: it needs multi-head "
             f"attention (no --n_kv_heads, no --mla_kv_rank)")


def check_gates(args: Hyperparameters, fail):
    """--mudd_gate_block, --mudd_gate_attn_layers: blocks that exist and have what the gates weigh, gates only where
    the sub-layer form gives their values a place."""
    L, k = args.num_layers, args.mudd_gate_block
    attention = set(range(L)) - set(parse_layer_list(args.no_attn_layers))
    try:
        gated_attn = parse_layer_list(args.mudd_gate_attn_layers)
    except ValueError:
        fail(f"--mudd_gate_attn_layers={args.mudd_gate_attn_layers!r}: expected block indices such as '3,10'")
    if k < 0:
        if gated_attn:
            fail("--mudd_gate_attn_layers scales heads by MUDD gate values: it needs --mudd_gate_block")
        return
    if gated_attn:
        refuse_without_head_hooks(args, "--mudd_gate_attn_layers", fail)
    if not 1 <= k < L or k == args.mudd_block:
        fail(f"--mudd_gate_block={k}: the block whose input feeds the second gate must be in 1..{L - 1} (the first "
             f"gate, from x0, serves the blocks before it) and not the --mudd_block (recipe: 4)")
    if not args.sublayer_lambdas:
        fail("--mudd_gate_block gates the x0 and bigram terms that --sublayer_lambdas adds after each attention: "
             "add --sublayer_lambdas")
    bad = sorted(set(gated_attn) - attention)
    if bad or len(set(gated_attn)) != len(gated_attn):
        fail(f"--mudd_gate_attn_layers={args.mudd_gate_attn_layers!r} must name different blocks with attention; "
             f"{bad or 'a block twice'}")


def parse_mudd_sources(text: str) -> list[tuple[str | int, float]]:
    """--mudd_final_sources "in,7:-0.5,9,ve0,3" -> [("in", 0.0), (7, -0.5), (9, 0.0), ("ve0", 0.0), (3, 0.0)]:
    per source its effective init (default 0). "in" = the residual entering block 0 (the recipe's c0), an integer N =
    block N's output, "veK" = value-embedding table K read at the input tokens (ValueError when malformed)."""
    sources = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, init = item.partition(":")
        if name != "in" and not (name.startswith("ve") and name[2:].isdigit()):
            name = int(name)
        sources.append((name, float(init) if init else 0.0))
    return sources


class GatedExclusiveSelfAttention(nn.Module):
    """XSA with alpha per token and head from a MUDD gate (--mudd_gate_block; frontier recipe 3.4, r85): the same
    projection as ExclusiveSelfAttention, strength tanh(alpha_h(t)), alpha_h(t) = sources[key] (init 0)."""

    def __init__(self, heads: int, kv_heads: int, key: str):
        super().__init__()
        self.group, self.key = heads // kv_heads, key

    def forward(self, y: Tensor, v: Tensor, sources: dict) -> Tensor:
        return remove_value_component(y, v, self.group, torch.tanh(sources[self.key].float())[..., None])


class GatedHeadScale(nn.Module):
    """The attention gate of the gated recipe (--mudd_gate_attn_layers; frontier recipe 3.4 [H], r85): each head's
    output times a raw per-token MUDD gate value (no sigmoid), init 0.25."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, y: Tensor, x: Tensor, sources: dict) -> Tensor:  # y (B, T, heads, head_dim)
        return sources[self.key][..., None] * y


class GatedDynamicComposition(nn.Module):
    """DynamicComposition with w1, w2 per token and head from a MUDD gate (--mudd_gate_block; the recipe's r85
    form: its second gate's last 12 values, w1 init 1, w2 init 0)."""

    def __init__(self, layer: int):
        super().__init__()
        self.keys = f"gate.dc_w1_{layer}", f"gate.dc_w2_{layer}"

    def forward(self, y: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, sources: dict) -> Tensor:
        w1, w2 = (sources[key][..., None] for key in self.keys)  # (B, T, heads, 1)
        return compose_heads(y, q, k, v, scale, sources["masks"]["dc"], w1, w2)


class GatedAdd(nn.Module):
    """x + g t, g a per-token MUDD gate value (B, T, 1) that GPT.hidden put in sources[key] (--mudd_gate_block)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, x: Tensor, t: Tensor, sources: dict) -> Tensor:
        return x + sources[self.key] * t


class GateScale(nn.Module):
    """g t, g = sources[key] (B, T, 1): a skip's per-token MUDD gate (--mudd_gate_block)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, t: Tensor, sources: dict) -> Tensor:
        return sources[self.key] * t


MUDD_HIDDEN, MUDD_SCALE = 64, 0.1  # the recipe's F_j: 64 hidden units, outputs times 0.1


class MuddWeights(nn.Module):
    """MUDD's per-token mixing weights (frontier recipe 3.5, r81; arXiv 2502.12170): m = F(z) = 0.1 (W2 GELU(W1 z)
    + b), z the un-normalized residual (T, dim) -> m (T, n). W1 (64, dim) ~ U(+-1/sqrt(dim)) (nn.Linear's default,
    kaiming-uniform a=sqrt(5)), W2 (n, 64) zero, b = inits / 0.1, so m starts at the given effective inits for every
    token. m is computed in fp32 and returned in z's dtype. W1, W2 train in Adam's "mudd" group, b in "mudd_bias"
    (no weight decay), at --mudd_lr (param_groups)."""

    draws_own_init = True  # --weight_init leaves W1, W2, b alone (truncated_init.recipe_matrices)

    def __init__(self, dim: int, inits: list[float]):
        super().__init__()
        bound = dim ** -0.5
        self.w1 = nn.Parameter(torch.empty(MUDD_HIDDEN, dim).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.zeros(len(inits), MUDD_HIDDEN))
        self.b = nn.Parameter(torch.tensor(inits, dtype=torch.float32) / MUDD_SCALE)

    def forward(self, z: Tensor) -> Tensor:
        return (MUDD_SCALE * self.unscaled(z)).type_as(z)

    def unscaled(self, z: Tensor) -> Tensor:  # W2 GELU(W1 z) + b in fp32
        h = F.gelu(F.linear(z, self.w1.type_as(z)))
        return F.linear(h, self.w2.type_as(h)).float() + self.b


class MuddGate(MuddWeights):
    """MUDD gates (--mudd_gate_block; frontier recipe 3.5, r85): G(z) = s (W2 GELU(W1 z) + b), MuddWeights with a
    learned scale s (init 0.1; the r85 README adds it for stability; one s shared by both gates, as in the record's
    code) in place of the fixed 0.1, so the values start at their effective inits (b = init / 0.1). Its outputs are
    named per-token values, (key, width, init) each from mudd_gate_outputs: forward writes sources[key] = (B, T,
    width) for the modules that read them (GatedAdd, GateScale, GatedExclusiveSelfAttention, GatedHeadScale,
    GatedDynamicComposition) and returns z. W1, W2 train in Adam's "mudd_gate" group, b and s in "mudd_gate_bias",
    at --mudd_gate_lr."""

    def __init__(self, dim: int, outputs: list[tuple[str, int, float]]):
        super().__init__(dim, [init for _, width, init in outputs for _ in range(width)])
        self.scale = nn.Parameter(torch.tensor([MUDD_SCALE]))
        self.keys, self.widths = [key for key, _, _ in outputs], [width for _, width, _ in outputs]

    def forward(self, z: Tensor, sources: dict) -> Tensor:
        g = (self.scale[0] * self.unscaled(z)).type_as(z)
        sources.update(zip(self.keys, g.split(self.widths, dim=-1)))
        return z


def mudd_gate_outputs(args: Hyperparameters) -> tuple[list, list]:
    """--mudd_gate_block=k (frontier recipe 3.5, r85): the (key, width, init) outputs of the gate that reads x0 and
    serves the blocks before k, and of the gate that reads block k's input and serves k and the later blocks: per
    XSA block its heads' alphas (init 0), per --mudd_gate_attn_layers block its heads' output scales (0.25), per
    block with attention (not --mudd_block) its x0 weight (0) and with --bigram_rows its bigram weight (0.05;
    block 0's weighs b at the input), per skip its weight (0.5, times the skip's own sigmoid; a skip into block k
    is added before k's gate runs, so the x0 gate serves it), per --dc_layers block its heads' w1 (1) and w2 (0).
    The recipe's layout gives 26 and 41 outputs (12 of the 41 for DC at layer 10)."""
    k, H = args.mudd_gate_block, args.num_heads
    if k < 0:
        return [], []
    attention = sorted(set(range(args.num_layers)) - set(parse_layer_list(args.no_attn_layers)))
    outputs = [(i, f"gate.xsa{i}", H, 0.0) for i in parse_layer_list(args.xsa_layers)]
    outputs += [(i, f"gate.attn{i}", H, 0.25) for i in parse_layer_list(args.mudd_gate_attn_layers)]
    for i in (i for i in attention if i != args.mudd_block):
        outputs += [(i, f"gate.x0_{i}", 1, 0.0)] + ([(i, f"gate.bigram{i}", 1, 0.05)] if args.bigram_rows else [])
    outputs += [(dst - 0.5, f"gate.skip{w}", 1, 0.5) for w, (src, dst) in enumerate(skip_connections(args))]
    for i in parse_layer_list(args.dc_layers):
        outputs += [(i, f"gate.dc_w1_{i}", H, 1.0), (i, f"gate.dc_w2_{i}", H, 0.0)]
    return ([(key, w, init) for i, key, w, init in outputs if i < k],
            [(key, w, init) for i, key, w, init in outputs if i >= k])


class MuddHeadGates(nn.Module):
    """MuddBlock's value-embedding gate: the first ceil(H/2) heads times m6, the others times m7 (no sigmoid), plus
    the block's value terms. Without a value embedding in that block MuddBlock has PassThrough instead (values
    only)."""

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("first", torch.arange(heads) < (heads + 1) // 2, persistent=False)

    def forward(self, values: Tensor, m6: Tensor, m7: Tensor, ve: Tensor) -> Tensor:  # m6, m7 (B, T, 1)
        gate = torch.where(self.first[:, None], m6[..., None], m7[..., None])  # (B, T, heads, 1)
        return (gate * ve.view(*ve.shape[:-1], self.first.numel(), -1)).flatten(-2) + values


class ScaledAdd(nn.Module):
    """x + m b: MuddBlock's bigram term (PassThrough without --bigram_rows: b = 0)."""

    def forward(self, x: Tensor, m: Tensor, b: Tensor) -> Tensor:
        return x + m * b


class MuddBlock(nn.Module):
    """--mudd_block=k, --mudd_block_source=c (frontier recipe 3.5, MUDD's j=0 at the recipe's layer 10, c = 7):
    block k with 14 per-token mixes m = MuddWeights(x) of its input x in place of Block's lambdas:
      V += m0 c0 + m1 c + m2 x   (c0 = the residual entering block 0, c = block c's output; model_dim = all heads)
      x <- (1 + m5) x + m3 c0 + m4 c
      value-embedding gate: the first ceil(H/2) heads m6, the others m7 (no sigmoid; replaces ValueEmbedGate)
      a = Attn(RMSNorm(c))   (the recipe's r77: its attention reads c, not x)
      x <- m8 x + m9 a + m10 c0 + m11 b   (b = the bigram embedding; the record's m10 term reads c0, not x0)
      x <- m12 x + m13 MLP(RMSNorm(x))
    Effective inits m6 = m7 = 2, m8 = m12 = sqrt(1.1), m9 = m13 = 1, m11 = 0.05, the rest 0. The value terms enter
    the attention the way its value embedding does: v = l0 v + l1 (gated ve + m0 c0 + m1 c + m2 x) with #21's
    lambdas (l1 init 0.5), or v = l0 v + (gated ve + ...) as the record adds them under --attn_lambdas=o. Without a
    value embedding in block k, m6 and m7 gate nothing; without --bigram_rows, b = 0 (m11 idle): both chosen at
    build time. check_mudd asks for attention with model_dim-wide values."""
    INITS = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.1 ** 0.5, 1.0, 0.0, 0.05, 1.1 ** 0.5, 1.0]

    def __init__(self, args: Hyperparameters, layer: int, max_seq_len: int):
        super().__init__()
        self.attn = build_attention(args, max_seq_len, layer)
        self.attn.ve_gate = PassThrough()  # --ve_gate's (zero-init: no random draw) gives way to m6, m7
        self.mlp = build_mlp(args, layer)
        self.mudd = MuddWeights(args.model_dim, self.INITS)
        self.source = args.mudd_block_source
        self.ve_gate = MuddHeadGates(args.num_heads) if value_embed_tables(args)[layer] is not None else PassThrough()
        self.add_bigram = ScaledAdd() if args.bigram_rows > 0 else PassThrough()
        self.dropout = nn.Identity()  # --dropout: features/dropout.py installs it

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mask, sources: dict) -> Tensor:
        c0, c = sources["in"], sources[self.source]
        m = self.mudd(x).unsqueeze(-1).unbind(-2)  # 14 x (B, T, 1)
        values = self.ve_gate(m[0] * c0 + m[1] * c + m[2] * x, m[6], m[7], ve)
        x = (1 + m[5]) * x + m[3] * c0 + m[4] * c
        x = m[8] * x + m[9] * self.dropout(self.attn(norm(c), values, mask, sources)) + m[10] * c0
        x = self.add_bigram(x, m[11], sources.get("bigram"))
        return m[12] * x + m[13] * self.dropout(self.mlp(norm(x)))


class MuddFinalMix(nn.Module):
    """--mudd_final_sources (frontier recipe 3.3/3.5, MUDD's j=1, r81): before the final norm,
    x <- x + sum_k m_k s_k with m = MuddWeights(x) per token (x the un-normalized final residual) and the sources
    s_k in the flag's order: "in" = the residual entering block 0 (c0), N = block N's output, "veK" = value-embedding
    table K at the input tokens; m_k starts at the source's init. The recipe's "in,7:-0.5,9,ve0,3" is
    x + m0 c0 + m1 c7 + m2 c9 + m3 VE_0(x_t) + m4 c3 (c9 = block 9's output = block 10's input), and at init it is
    --backout_layer=7 (x - 0.5 c7) bit for bit."""

    def __init__(self, dim: int, sources: list[tuple[str | int, float]]):
        super().__init__()
        self.sources = [(name.startswith("ve"), int(name[2:])) if isinstance(name, str) and name != "in" else
                        (False, name) for name, _ in sources]  # (from the value embeddings?, key)
        self.mudd = MuddWeights(dim, [init for _, init in sources])

    def forward(self, x: Tensor, outputs: dict, ves: list) -> Tensor:
        m = self.mudd(x).unsqueeze(-1).unbind(-2)
        for m_k, (is_ve, key) in zip(m, self.sources):
            x = x + m_k * (ves[key] if is_ve else outputs[key])
        return x



def block(args: Hyperparameters, layer: int, max_seq_len: int) -> nn.Module | None:
    return MuddBlock(args, layer, max_seq_len) if layer == args.mudd_block else None


def gated(role: str, args: Hyperparameters, index: int) -> nn.Module | None:
    """With --mudd_gate_block, the module that weighs `role` of block (or skip) `index` by its per-token gate value
    (mudd_gate_outputs names them): x0 and bigram terms, skips, XSA alphas, DC weights, the heads' output scales
    on --mudd_gate_attn_layers."""
    if args.mudd_gate_block < 0:
        return None
    if role == "bigram" and not args.bigram_rows:  # no bigram table: no term to weigh
        return None
    if role == "head_scale":
        return GatedHeadScale(f"gate.attn{index}") if index in parse_layer_list(args.mudd_gate_attn_layers) else None
    build = dict(x0=lambda: GatedAdd(f"gate.x0_{index}"), bigram=lambda: GatedAdd(f"gate.bigram{index}"),
                 skip=lambda: GateScale(f"gate.skip{index}"), dc=lambda: GatedDynamicComposition(index),
                 xsa=lambda: GatedExclusiveSelfAttention(args.num_heads, kv_heads(args), f"gate.xsa{index}"))
    return build[role]()


def install(model: nn.Module, args: Hyperparameters):
    """The j=1 mix (--mudd_final_sources) and the gates (--mudd_gate_block=k: the one from x0, before block 0, and
    the one block k runs on its input), built after the core model, so every other parameter is the draw it would
    be without them (the model with --backout_layer=N and the one with "N:-0.5" agree at init)."""
    dim, sources = args.model_dim, parse_mudd_sources(args.mudd_final_sources)
    model.kept_outputs |= {n for n, _ in sources if isinstance(n, int)} | (
        {args.mudd_block_source} if args.mudd_block >= 0 else set())
    if sources:
        model.mudd_final = MuddFinalMix(dim, sources)
    before, after = mudd_gate_outputs(args)
    if before:
        model.pre_gate = MuddGate(dim, before)
    if after:
        model.blocks[args.mudd_gate_block].entry_gate = gate = MuddGate(dim, after)
        if before:  # the record has one scale s for both gates: the second gate shares the first's parameter
            gate.scale = model.pre_gate.scale


def param_groups(model: nn.Module, args: Hyperparameters | None) -> dict:
    """W1, W2 and b of the mixes ("mudd", "mudd_bias") and of the gates ("mudd_gate", "mudd_gate_bias" with the
    shared scale s), Adam's at --mudd_lr / --mudd_gate_lr (recipe 2.2)."""
    mudd = [m for m in model.modules() if type(m) is MuddWeights]
    gates = [m for m in model.modules() if isinstance(m, MuddGate)]
    if not mudd + gates:
        return {}
    return dict(mudd=[p for m in mudd for p in (m.w1, m.w2)], mudd_bias=[m.b for m in mudd],
                mudd_gate=[p for m in gates for p in (m.w1, m.w2)],
                mudd_gate_bias=[m.b for m in gates] + list({id(m.scale): m.scale for m in gates}.values()))


def adam_lrs(args: Hyperparameters) -> dict:
    return dict(mudd=args.mudd_lr, mudd_bias=args.mudd_lr, mudd_gate=args.mudd_gate_lr,
                mudd_gate_bias=args.mudd_gate_lr)


def record_fp32_params(model: nn.Module) -> list:
    """The gates' scale s stays fp32 under --param_dtype=record (the record keeps it so)."""
    return [m.scale for m in model.modules() if isinstance(m, MuddGate)]


def model_parts(model: nn.Module, args: Hyperparameters) -> list:
    """W1, W2, b per mix; FLOPs = its two matrices (the n weighted adds of dim-wide sources, 2 n dim each, are
    elementwise: not counted)."""
    mudds = [m for m in model.modules() if isinstance(m, MuddWeights)]
    if not mudds:
        return []
    return [ModelPart("mudd", sum(map(count_params, mudds)), "mudd", sum(map(dense_flops_per_token, mudds)), 2)]
