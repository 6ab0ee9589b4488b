"""NanoGPT speedrun harness: one torchrun script that trains a GPT-2-small-class model on a fixed FineWeb budget.

    torchrun --standalone --nproc_per_node=8 train_gpt.py [--name=value ...]   # or ./run.sh
    python train_gpt.py --preset=smoke --train_files=... --val_files=...        # CPU, single process

Defaults reproduce the FlexAttention-era speedrun recipe (record #21: 1770 steps, 393,216 tokens per step, target
val loss 3.28). The file reads in the order data flows: flags, distributed setup, kernels/optimizer, model blocks,
model, data loader, logging/records, training loop. Every run is written to records/ (see records/README.md).
"""

import copy
import dataclasses
import difflib
import functools
import glob
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import kernels  # its launch-config table: kernels.config_table

HERE = Path(__file__).resolve().parent
# Run as a script this module is __main__; features/*.py import it as train_gpt, which must be this same module
sys.modules.setdefault("train_gpt", sys.modules[__name__])

# -----------------------------------------------------------------------------------------------------------------
# Flags


@dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards, read in sorted order
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # validation always reads the first val_tokens tokens of the val stream
    seq_len: int = 48 * 1024  # training tokens per sequence (one sequence per micro-step, batch dimension 1)
    val_seq_len: int = 4 * 64 * 1024  # validation tokens per GPU per validation step
    micro_batches: int = 8  # sequences per optimizer step; each rank runs micro_batches / world_size of them
    # model
    vocab_size: int = 50257  # GPT-2 vocabulary; the head is padded to a multiple of 128
    num_layers: int = 12  # transformer blocks (even for the U-net, which pairs block i with num_layers-1-i)
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # head dim = model_dim / num_heads
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * model_dim
    num_value_embeds: int = 3  # value-embedding tables, used by the first and the last num_value_embeds layers
    no_attn_layers: str = "7"  # comma-separated block indices that have no attention ("" = none)
    attn_scale: float = 0.12  # fixed softmax scale (q and k are RMS-normed)
    rope: str = "half"  # half: half the head dims rotated, frequencies 1..1/1024 | canonical: all dims, base 10000
    window_pattern: str = "LSSSLS"  # Long/Short window per block for the first half, mirrored (or every block)
    window_schedule_tokens: int = 1728  # long window at step s of S: this * s / S rounded up to a multiple of 128
    window_unit: str = "block"  # window W: block = the last W key blocks of 128 (#21) | token = keys <= 128 W back
    # architecture ablations (issue 6), each off by default; describe_model() prints their params and FLOPs/token
    n_kv_heads: int = 0  # grouped-query attention: K/V heads shared by num_heads/n_kv_heads queries (0 = num_heads)
    mlp_act: str = "relu2"  # relu2 | gelu | swiglu (hidden 2/3 * mlp_ratio * dim, rounded to 128) | learned_gelu
    weight_init: str = "uniform"  # uniform | truncated: the matrices' init, both std 0.5/sqrt(fan_in) (see build_model)
    # the recipe's shape and inits (frontier recipe 3.1-3.3): which blocks read which tables and skips, the lambdas
    value_embed_layers: str = ""  # blocks reading value-embedding tables 0, 1, ... in order ("" = first/last nve)
    skip_pairs: str = ""  # skips "src:dst,...": dst's input += w * src's output ("" = U-net, block i -> L-1-i)
    resid_lambda_init: float = 1.0  # init of each block's x-lambda (x = l0 * x + l1 * x0); frontier: 1.1
    attn_lambdas: str = "ve"  # ve: v = l0 v + l1 ve (#21, l = 0.5, 0.5) | o: v = l0 v + ve, out = l1 proj(y) (r47, 1)
    attn_proj_init: str = "zero"  # zero | uniform: attention output projections' init (frontier r64: uniform)
    value_embed_std: float = 1.0  # std of the value-embedding tables' normal init (frontier: 0.01)
    head_init_std: float = 0.0  # lm_head init: 0 = zeros (#21), else normal with this std (frontier: 0.005)
    # optimization
    num_iterations: int = 1770  # optimizer steps
    cooldown_frac: float = 0.4  # fraction of steps spent decaying the LR linearly
    final_lr_frac: float = 0.1  # LR multiplier reached at the last step
    muon_lr: float = 0.05  # Muon: every 2-D matrix inside the blocks
    muon_momentum_start: float = 0.85  # Nesterov momentum at step 0 ...
    muon_momentum_end: float = 0.95  # ... reached after muon_momentum_warmup_steps
    muon_momentum_warmup_steps: int = 300  # linear momentum warm-up length
    ns_steps: int = 5  # Newton-Schulz iterations
    head_lr: float = 0.008  # Adam: lm_head
    embed_lr: float = 0.6  # Adam: token and value embeddings
    scalar_lr: float = 0.04  # Adam: residual lambdas, value-mixing lambdas, U-net skip weights
    adam_beta1: float = 0.8  # Adam betas and eps (all Adam groups)
    adam_beta2: float = 0.95  # second-moment decay
    adam_eps: float = 1e-10  # tiny: updates stay sign-like for small gradients
    # post-#21 optimizer ideas (frontier recipe sections 2.1-2.2), each off by default
    muon_ns: str = "quintic"  # quintic (#21's fixed Newton-Schulz) | polar_express (5 per-step coefficient sets)
    muon_wd: float = 0.0  # cautious weight decay for Muon: W -= muon_wd * lr * eta * W where update and W agree
    muon_proj_lr_mult: float = 1.0  # extra Muon LR factor for the MLP output projections (c_proj)
    muon_momentum_cooldown_steps: int = 0  # over the last N steps momentum returns linearly to muon_momentum_start
    value_embed_lr: float = 0.0  # Adam LR of the value embeddings (0 = embed_lr)
    adam_group_betas: str = ""  # per Adam group betas "head=0.5/0.95,embed=...,value_embeds=...,scalars=..."
    param_dtype: str = "r21"  # on GPU, r21: bf16 embeddings, fp32 rest | record: the record's bf16 Adam tensors too
    adam_group_lr: str = ""  # LR of the small groups "ve_gate=0.008,smear_gate=8e-5,..." (not named: scalar_lr)
    adam_every: int = 1  # step Adam every N steps on the gradients of those N steps summed (frontier: 2)
    softcap: str = "r21"  # logit softcap: r21 = 30 sigmoid(z / 7.5) | frontier = 23 sigmoid((z + 5) / 7.5)
    # training stages (frontier recipe section 1): each stage its own sequence length, document cap, windows, LR
    stages: str = ""  # "seq_len:doc_cap:short-long:lr_mult,..." equal thirds of num_iterations ("" = #21's schedule)
    extension_steps: int = 0  # steps after num_iterations at the final LR with extension_window
    extension_window: str = ""  # short-long windows in blocks for the extension steps ("" = the last stage's)
    val_window: str = ""  # short-long windows in blocks for the final validation ("" = the training window)
    # evaluation and runtime
    val_every: int = 125  # validate every this many steps (and at the end); 0 = only at the end
    compile: bool = True  # torch.compile the model (ignored on CPU, where inductor would only slow tests down)
    warmup_steps: int = 10  # untimed compile warm-up steps on random tokens; model and optimizers reset after
    fp8_head: bool = True  # FP8 lm_head matmul in training where the GPU supports it (compute capability >= 8.9)
    seed: int = 0  # model init (identical on every rank); the data order is fixed and never shuffled
    # checkpoints (one format: weights, optimizer states, step, flags, code, data position; see save_checkpoint)
    save_every: int = 0  # write a checkpoint every N steps next to the record file (0 = never)
    keep_checkpoints: int = 2  # periodic checkpoints kept, the newest (0 = all); final and interrupted ones always
    save_checkpoint: str = "off"  # at the end of the run: off | full (resumable) | weights (weights + flags only)
    resume: str = ""  # checkpoint path: continue that run exactly (its flags; flags given here still win)
    init_from: str = ""  # checkpoint path: take only the weights; fresh optimizers and schedule from step 0
    init_partial: bool = False  # with init_from: skip tensors whose shape differs instead of stopping
    # records
    records_dir: str = "records"  # root of the record tree; a relative path is taken beside train_gpt.py
    track: str = "track_1_short"  # records/<track>/...; compare runs only within a track
    run_name: str = "baseline"  # records/<track>/<date>_<run_name>/<uuid>.txt
    preset: str = ""  # named set of defaults applied before explicit flags: smoke


# Tiny CPU configuration that still runs every baseline code path: value embeddings, U-net skips, a block without
# attention, long/short windows that grow (1 -> 3 blocks), Muon + Adam, gradient accumulation (2-way on one process;
# --micro_batches=8 for the full 8-way layout).
SMOKE = dict(
    num_layers=4, model_dim=128, num_heads=2, num_value_embeds=1, no_attn_layers="2", window_pattern="LS",
    seq_len=512, micro_batches=2, val_seq_len=1024, val_tokens=4096, window_schedule_tokens=384,
    num_iterations=30, val_every=10, warmup_steps=0, compile=False,
    track="local", run_name="smoke",
)

# The data, schedule and optimizer half of the post-#21 recipe (../shared/docs/frontier_recipe.md sections 1-2,
# 3.7's softcap) on #21's model. Values from the recipe; where our model differs they are noted.
FRONTIER = dict(
    # sections 1.1-1.5: document-aligned batches, three stages of 131k/262k/393k tokens (8 sequences of 16k/32k/48k,
    # documents capped at 896/2048), windows (short-long blocks) per stage, 15 extension steps, YaRN, validation
    bos_align=True, stages="16384:896:1-3:1.0,32768:2048:3-7:1.52,49152:2048:5-11:1.73", num_iterations=1270,
    extension_steps=15, extension_window="6-13", val_window="6-20", cooldown_frac=0.6, final_lr_frac=0.15,
    yarn=True, attn_scale=0.1, val_every=250,
    # FA3's window_size=(128 W, 0): a query sees the keys 0..128 W tokens back (128 W + 1), not whole key blocks
    window_unit="token",
    # section 2.1: Polar Express + NorMuon + cautious WD; c_fc gets 2x from its shape, c_proj 4x (ours is stored
    # 768x3072, the recipe's 3072x768, so the 4x is all muon_proj_lr_mult)
    muon_ns="polar_express", normuon_beta2=0.9, muon_wd=1.2, muon_lr=0.023, muon_proj_lr_mult=4.0,
    muon_momentum_cooldown_steps=50,
    # section 2.2: per-group Adam; the embedding is tied to the head until step 847 (3.2) and then trains with
    # the head's settings; the bigram table is in the value embeddings' group. The record's code (its param_table)
    # trains the value-embedding gates, the smear gate and the residual / output lambdas in groups of their own
    head_lr=0.008, embed_lr=0.008, value_embed_lr=0.6, scalar_lr=0.04, adam_every=2, adam_wd=0.005,
    adam_group_betas="head=0.5/0.95,embed=0.5/0.95,value_embeds=0.75/0.95,scalars=0.9/0.99,mudd=0.9/0.99,"
                     "mudd_bias=0.9/0.99,mudd_gate=0.9/0.99,mudd_gate_bias=0.9/0.99,ve_gate=0.9/0.99,"
                     "smear_gate=0.9/0.99,resid_lambdas=0.9/0.95,post_lambdas=0.9/0.95",
    adam_group_wd="head=150,embed=150,value_embeds=5,scalars=0,mudd=1,mudd_bias=0,mudd_gate=1,mudd_gate_bias=0,"
                  "ve_gate=1,smear_gate=0,resid_lambdas=0,post_lambdas=0",
    adam_group_lr="ve_gate=0.008,smear_gate=8e-5,post_lambdas=0.008",
    # the record's parameter dtypes (its code): bf16 storage for the head, embeddings, gates and MUDD weights on a
    # GPU (Adam's update rounded to bf16: small updates of large entries are lost), bf16 reads of the r / p lambdas
    param_dtype="record",
    mudd_lr=0.002, mudd_gate_lr=8e-4,
    softcap="frontier", run_name="frontier",
    # sections 3.1-3.4, the model half (Frontier II), in the recipe's 11-layer shape (r30/r35 dropped #21's first
    # layer): no attention in block 6, long windows on 3 and 10, five value-embedding tables read by blocks 1, 2
    # and 8, 9, 10 (r63/r70), one sigmoid-gated skip 3 -> 6 (r32/r45), MUDD (r81, 3.5): its j=1 mix of c0, c7,
    # c9, VE_0 and c3 before the final norm (m1 = -0.5 on c7: r40's backout at init) and its j=0 block 10 reading c7,
    # attention output projections uniform (r64), head N(0, 0.005^2) (r51). Smear (r34); key offset on the
    # long-window layers 3 and 10 (r49); VE gates on the value-embedding layers (r55/r70); XSA on layers 1,3,4,7
    # (r82, r85's set); bigram hash table of 7.5 x 50,304 rows with signs (r62/r83). The residual stream of 3.3:
    # per-sub-layer lambdas, r init sqrt(1.1) (r45), x0 and the bigram embedding added after each attention, layers
    # 8 and 9 attending over RMSNorm(c7) (r77); r85's MUDD gates (3.5): one from x0 for layers 0-3, one from the
    # residual entering layer 4 for the rest, giving per token the XSA alphas, the x0 and bigram weights, the skip
    # weight and the attention gates of layers 3 and 10 (the r28 sigmoid gate is gone in [H]).
    num_layers=11, no_attn_layers="6", window_pattern="SSSLSSSSSSL", num_value_embeds=5,
    value_embed_layers="1,2,8,9,10", value_embed_std=0.01, skip_pairs="3:6", skip_gate=True,
    mudd_final_sources="in,7:-0.5,9,ve0,3", mudd_block=10, mudd_block_source=7,
    attn_proj_init="uniform", head_init_std=0.005,
    sublayer_lambdas=True, attn_input_skips="7:8,7:9", mudd_gate_block=4, mudd_gate_attn_layers="3,10",
    # sections 3.2 and 3.7: embedding tied to the head through step 847 (r51, the first stage-3 step, odd so that
    # Adam updates at it); multi-token prediction (r53) and the prefix-token loss (r88) with the stage weights of 1.2
    untie_step=847, mtp_weights="1,0.5,0.25-0;1,0.5-0;1", prefix_weights="0.25;0.25-0;0",
    smear=True, key_offset=True, resid_lambda_init=1.1, ve_gate=True, xsa_layers="1,3,4,7",
    # the record's attention lambdas (r47, its sa_lambdas): v = l0 v + ve (coefficient 1), output times l1 (init 1)
    attn_lambdas="o",
    bigram_rows=377_280,
    # paired-head attention on the recipe's layers 0, 2, 5, 9 (r58; none of them has XSA) and Muon on Q and K per
    # head pair (r80, section 2.1 item 7)
    paired_head_layers="0,2,5,9", muon_qk_pairs=True,
    # r85's lightweight DC on layer 10 (3.4), its w1, w2 per token from the second MUDD gate
    dc_layers="10",
    # section 3.6: FP8 MLP matmuls (r84 up, r89 down with delayed scaling); acts only on GPUs with FP8
    fp8_mlp=True,
)

PRESETS = {
    "smoke": SMOKE,
    "frontier": FRONTIER,
    # frontier at smoke size on CPU: three short stages (256/512/768-token sequences), extension, YaRN
    "frontier_smoke": {**FRONTIER, **{k: v for k, v in SMOKE.items() if k not in ("seq_len", "window_schedule_tokens")},
                       **dict(
        stages="256:256:1-1:1.0,512:384:1-3:1.52,768:512:2-4:1.73", num_iterations=30, extension_steps=3,
        extension_window="2-5", val_window="3-6", val_every=10, muon_momentum_warmup_steps=10,
        muon_momentum_cooldown_steps=5, run_name="frontier_smoke",
        # the smoke model's 4 blocks have attention in 0, 1, 3 (windows L S S L): value-embedding tables in
        # blocks 1 and 3, the gated skip into the attention-free block 2 (the recipe's 3 -> 6); MUDD's j=1 mix of
        # c0, c2 (the recipe's c7, init -0.5; also the last block's input, its c9), c1 (its c3) and VE_0, and its
        # j=0 in the last block reading c2; XSA on the two after the first; a bigram table sized for the ~40k
        # tokens a smoke run reads (the recipe's 377,280 x 128 would be 48M parameters); MUDD gates from x0 for
        # blocks 0, 1 and from block 2's input for 2, 3, the attention gate on block 3 (the recipe's 3 and 10 are
        # long-window blocks without paired heads; block 0 is paired), DC in block 3 (the recipe's MUDD block 10)
        num_value_embeds=2, value_embed_layers="1,3", skip_pairs="1:2", xsa_layers="1,3", bigram_rows=8192,
        mudd_final_sources="in,2:-0.5,1,ve0", mudd_block=3, mudd_block_source=2, attn_input_skips="",
        mudd_gate_block=2, mudd_gate_attn_layers="3", dc_layers="3",
        paired_head_layers="0",  # the first attention block (no XSA); its 2 heads are one pair, so per-pair
        # Muon (inherited) orthogonalizes the same matrices as whole Q and K here
        untie_step=21)},  # the first odd step of stage 3 (steps 20-29)
}


def apply_overrides(args: Hyperparameters, argv: list[str]) -> Hyperparameters:
    """Apply `--name=value` flags to args (in place, returned). A preset is applied first, so explicit flags win."""
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    valid = "valid flags: " + ", ".join(f"--{name}" for name in fields)
    pairs = []
    for item in argv:
        if item in ("--help", "-h"):
            print(flag_help())
            raise SystemExit(0)
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"error: expected --name=value, got {item!r}\n{valid}")
        name, value = item[2:].split("=", 1)
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hint = f"; did you mean --{near[0]}?" if near else f"\n{valid}"
            raise SystemExit(f"error: unknown flag --{name}{hint} (--help lists every flag)")
        pairs.append((name, value))
    for name, value in pairs:
        if name == "preset":
            if value not in PRESETS and value != "":
                raise SystemExit(f"error: unknown preset {value!r}; valid presets: {', '.join(PRESETS)}")
            for k, v in PRESETS.get(value, {}).items():
                setattr(args, k, v)
    for name, value in pairs:
        setattr(args, name, _parse_value(name, fields[name].type, value, valid))
    return args


# Values kept for flags whose type grew: --save_checkpoint=true was a bool before it could say "weights".
FLAG_ALIASES = dict(save_checkpoint={"true": "full", "1": "full", "false": "off", "0": "off"})


def _parse_value(name, typ, value, valid):
    try:
        if typ is bool:
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError("bools accept true/false/1/0")
            return lowered in ("true", "1")
        return FLAG_ALIASES.get(name, {}).get(value.lower(), typ(value))
    except ValueError as e:
        raise SystemExit(f"error: --{name}={value!r} is not a valid {typ.__name__} ({e})\n{valid}") from None


def flag_help() -> str:
    """The flag table for --help: name, default and the comment beside it in the Hyperparameters class."""
    lines = ["usage: torchrun --standalone --nproc_per_node=N train_gpt.py [--name=value ...]   (or ./run.sh)",
             f"presets: {', '.join(PRESETS)} (--preset=NAME applies its values first; explicit flags win)", ""]
    source = Path(__file__).read_text().split("class Hyperparameters:", 1)[1].split("\n\n\n", 1)[0]
    sources = [source] + [inspect.getsource(flags) for flags in feature_hooks("Flags")]
    for line in "\n".join(sources).splitlines():
        stripped = line.strip()
        if stripped.startswith("# "):  # a section heading
            lines.append(f"[{stripped[2:]}]")
        elif ":" in stripped and "=" in stripped and not stripped.startswith(("class ", "@", '"')):
            name = stripped.split(":", 1)[0]
            comment = stripped.split("#", 1)[1].strip() if "#" in stripped else ""
            lines.append(f"  --{name}={getattr(Hyperparameters(), name)!r}  {comment}")
    return "\n".join(lines)


def changed_flags(args: Hyperparameters) -> dict:
    defaults = Hyperparameters()
    return {k: v for k, v in dataclasses.asdict(args).items() if getattr(defaults, k) != v}


def check_config(args: Hyperparameters, world_size: int):
    """Reject configurations the model or the batch layout cannot run, with the fix in the message."""
    def fail(msg):
        raise SystemExit(f"error: {msg}")
    check_ranges(args, fail)  # first: the checks below divide by these values
    valid_ws = [w for w in range(1, args.micro_batches + 1) if args.micro_batches % w == 0]
    if args.micro_batches % world_size:
        fail(f"world size {world_size} does not divide micro_batches={args.micro_batches} (the global batch is "
             f"micro_batches x seq_len tokens); valid world sizes: {', '.join(map(str, valid_ws))}")
    if args.num_layers < 2 or (args.num_layers % 2 and not args.skip_pairs):
        fail(f"num_layers={args.num_layers} must be even and >= 2 (U-net skips pair block i with block L-1-i); "
             f"an odd depth needs its skips listed: --skip_pairs=src:dst,...")
    if 2 * args.num_value_embeds > args.num_layers and not args.value_embed_layers:
        fail(f"num_value_embeds={args.num_value_embeds} needs 2*num_value_embeds <= num_layers={args.num_layers} "
             f"(or --value_embed_layers naming one block per table)")
    if args.model_dim % args.num_heads or (args.model_dim // args.num_heads) % 4:
        fail(f"model_dim={args.model_dim} / num_heads={args.num_heads} must be an integer head dim divisible by 4")
    for name in ("seq_len", "val_seq_len"):
        if getattr(args, name) % BLOCK_SIZE:
            fail(f"{name}={getattr(args, name)} must be a multiple of the attention block size {BLOCK_SIZE}")
    if args.val_tokens % (world_size * args.val_seq_len):
        fail(f"val_tokens={args.val_tokens} must be a multiple of world_size x val_seq_len = "
             f"{world_size * args.val_seq_len}")
    if (len(args.window_pattern) < args.num_layers // 2 or set(args.window_pattern) - set("LS")
            or (args.num_layers % 2 and len(args.window_pattern) != args.num_layers)):
        fail(f"window_pattern={args.window_pattern!r} needs num_layers/2={args.num_layers // 2} letters (mirrored; "
             f"an even depth only) or num_layers={args.num_layers} (one per block) from L (long) and S (short)")
    bad = [i for i in parse_layer_list(args.no_attn_layers) if not 0 <= i < args.num_layers]
    if bad:
        fail(f"no_attn_layers names blocks {bad} outside 0..{args.num_layers - 1}")
    check_architecture(args, fail)
    if args.save_checkpoint not in ("off", "full", "weights"):
        fail(f"--save_checkpoint={args.save_checkpoint!r}; valid values: off, full, weights")
    for check in feature_hooks("check"):
        check(args, fail)
    check_frontier_model(args, fail)
    check_model_shape(args, fail)
    check_schedule(args, fail)


# Numeric flags and the smallest value each accepts; upper bounds where they exist. Flags with richer rules (heads,
# windows, MoE, ...) are checked by the functions below.
MIN_VALUES = dict(num_iterations=1, seq_len=128, val_seq_len=128, micro_batches=1,
                  vocab_size=1, model_dim=4, num_heads=1, mlp_ratio=1, num_value_embeds=0,
                  val_tokens=1, window_schedule_tokens=1, ns_steps=1, muon_momentum_warmup_steps=0, val_every=0,
                  warmup_steps=0, save_every=0, keep_checkpoints=0,
                  muon_lr=0.0, head_lr=0.0, embed_lr=0.0, scalar_lr=0.0, adam_eps=0.0,
                  attn_scale=0.0, muon_wd=0.0, muon_proj_lr_mult=0.0,
                  muon_momentum_cooldown_steps=0, value_embed_lr=0.0, adam_every=1, extension_steps=0,
                  )
UNIT_INTERVAL = ("cooldown_frac", "final_lr_frac", "muon_momentum_start", "muon_momentum_end", "adam_beta1",
                 "adam_beta2")
# flag -> (what makes it meaningful, a predicate on args): setting the flag without that draws a warning
NEEDS = dict(
    keep_checkpoints=("--save_every", lambda a: a.save_every > 0),
    init_partial=("--init_from", lambda a: bool(a.init_from)),
    extension_window=("--extension_steps > 0", lambda a: a.extension_steps > 0),
    val_window=("--stages", lambda a: bool(a.stages)),
    window_schedule_tokens=("#21's schedule (it is replaced by --stages)", lambda a: not a.stages),
)


def check_ranges(args: Hyperparameters, fail):
    for field in dataclasses.fields(args):  # nan passes every comparison below, inf every lower bound
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{field.name}={value} must be a finite number")
    for name, low in feature_table("MIN_VALUES", MIN_VALUES).items():
        if getattr(args, name) < low:
            fail(f"--{name}={getattr(args, name)} must be >= {low}")
    for name in feature_table("UNIT_INTERVAL", UNIT_INTERVAL):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name}={getattr(args, name)} must be in [0, 1]")


def feature_table(name: str, core):
    """A core table (a dict, or a tuple of names) with every feature's table of that name added."""
    if isinstance(core, dict):
        return functools.reduce(lambda merged, table: {**merged, **table}, feature_hooks(name), core)
    return core + sum(map(tuple, feature_hooks(name)), ())


def meaningless_flags(args: Hyperparameters) -> list[str]:
    """Warnings for flags that differ from their default while the flags that would use them are off."""
    changed = changed_flags(args)
    return [f"warning: --{name}={changed[name]!r} has no effect without {what}"
            for name, (what, used) in feature_table("NEEDS", NEEDS).items() if name in changed and not used(args)]


def check_schedule(args: Hyperparameters, fail):
    """The post-#21 optimizer and stage flags (frontier recipe): values and combinations."""
    choices = dict(muon_ns=tuple(feature_table("ORTHOGONALIZERS", ORTHOGONALIZERS)), softcap=tuple(SOFTCAPS),
                   rope=("half", "canonical"), window_unit=tuple(WINDOW_RULES))
    for name, valid in choices.items():
        if getattr(args, name) not in valid:
            fail(f"--{name}={getattr(args, name)!r}; valid values: {', '.join(valid)}")
    parse_group_values(args.adam_group_betas, "adam_group_betas", parse_betas)
    if args.param_dtype not in PARAM_DTYPES:
        fail(f"--param_dtype={args.param_dtype!r}; valid values: {', '.join(PARAM_DTYPES)}")
    for name, lr in parse_group_values(args.adam_group_lr, "adam_group_lr", float).items():
        small = feature_table("SMALL_ADAM_GROUPS", SMALL_ADAM_GROUPS)
        if name not in small or not lr > 0 or not math.isfinite(lr):
            fail(f"--adam_group_lr: {name}={lr} must name one of {', '.join(small)} with a finite LR > 0 "
                 f"(the other groups have their own flags: --head_lr, --embed_lr, --value_embed_lr, --scalar_lr, and "
                 f"each feature's, e.g. --mudd_lr)")
    if args.adam_every > 1 and args.save_every % args.adam_every:
        fail(f"--save_every={args.save_every} must be a multiple of --adam_every={args.adam_every}, so periodic "
             f"checkpoints fall where Adam has just stepped")
    if not args.stages:
        if args.extension_steps:
            fail("--extension_steps needs --stages (the extension is a stage at the final LR)")
        return
    stages = training_stages(args)
    if len(stages) - (1 if args.extension_steps else 0) > args.num_iterations:
        fail(f"--stages has more stages than --num_iterations={args.num_iterations} steps")
    for st in stages:
        if st.seq_len % BLOCK_SIZE or st.seq_len < BLOCK_SIZE or st.doc_cap < 1:
            fail(f"--stages: seq_len {st.seq_len} must be a positive multiple of {BLOCK_SIZE} and doc_cap "
                 f"{st.doc_cap} >= 1")
    for flag in ("extension_window", "val_window"):
        if getattr(args, flag):
            parse_windows(getattr(args, flag), flag)


def check_architecture(args: Hyperparameters, fail):
    """The architecture-ablation flags (GQA, mlp_act, weight_init): values and combinations."""
    for name, valid in dict(mlp_act=feature_table("MLP_ACTS", MLP_ACTS),
                            weight_init=feature_table("WEIGHT_INITS", WEIGHT_INITS)).items():
        if getattr(args, name) not in valid:
            fail(f"--{name}={getattr(args, name)!r}; valid values: {', '.join(valid)}")
    H = args.num_heads
    divisors = [d for d in range(1, H + 1) if H % d == 0]
    if args.n_kv_heads < 0 or (args.n_kv_heads and H % args.n_kv_heads):
        fail(f"--n_kv_heads={args.n_kv_heads} must divide num_heads={H}; valid values: 0 (= num_heads), "
             f"{', '.join(map(str, divisors))}")


def check_frontier_model(args: Hyperparameters, fail):
    """--attn_lambdas names a form (the core's, or a feature's)."""
    lambdas = feature_table("ATTN_LAMBDAS", ATTN_LAMBDAS)
    if args.attn_lambdas not in lambdas:
        fail(f"--attn_lambdas={args.attn_lambdas!r}; valid values: {', '.join(lambdas)}")


def check_head_pairs(args: Hyperparameters, flag: str, fail):
    """A flag that pairs heads 2j, 2j+1 (--muon_qk_pairs, --paired_head_layers: their features): the heads
    (and GQA's K/V heads) must come in pairs, of multi-head or grouped-query attention."""
    own = feature_with("ATTENTION_NAME", args)  # an attention without per-head hooks (MLA; paired heads keep them)
    if own is not None:
        fail(f"{flag} pairs the heads of multi-head or grouped-query attention; {own.ATTENTION_NAME} has "
             f"no per-head q/k to pair (turn it off or drop {flag})")
    if args.num_heads % 2:
        fail(f"{flag} pairs heads 2j, 2j+1; num_heads={args.num_heads} is odd (use an even --num_heads)")
    if kv_heads(args) != args.num_heads and kv_heads(args) % 2:
        fail(f"{flag} pairs the K/V heads of grouped-query attention too; --n_kv_heads={args.n_kv_heads} is "
             f"odd (use an even --n_kv_heads, or 0 = num_heads)")


def refuse_without_head_hooks(args: Hyperparameters, flags: str, fail):
    """Per-head hooks act on the heads of the core's multi-head or grouped-query attention (HeadAttention); an
    attention a feature builds in its place (its ATTENTION_NAME: MLA) has none."""
    own = feature_with("ATTENTION_NAME", args)  # an attention without per-head hooks (MLA; paired heads keep them)
    if own is not None:
        fail(f"{flags} act on the heads of multi-head or grouped-query attention; {own.ATTENTION_NAME} has no "
             f"hooks for them")


def check_model_shape(args: Hyperparameters, fail):
    """--value_embed_layers, --skip_pairs and the init flags: indices in range, one block per table, skips forward
    in depth."""
    L = args.num_layers
    try:
        ve_layers, pairs = parse_layer_list(args.value_embed_layers), parse_skip_pairs(args.skip_pairs)
    except ValueError:
        fail(f"--value_embed_layers={args.value_embed_layers!r} / --skip_pairs={args.skip_pairs!r}: expected block "
             f"indices such as '1,2,8' and src:dst pairs such as '3:6,2:7'")
    if args.value_embed_layers and (len(ve_layers) != args.num_value_embeds or len(set(ve_layers)) != len(ve_layers)
                                    or not all(0 <= i < L for i in ve_layers)):
        fail(f"--value_embed_layers={args.value_embed_layers!r} must name num_value_embeds={args.num_value_embeds} "
             f"different blocks in 0..{L - 1} (block k of the list reads table k)")
    bad = [f"{a}:{b}" for a, b in pairs if not 0 <= a < b < L]
    if bad:
        fail(f"--skip_pairs {bad}: each src:dst needs 0 <= src < dst < num_layers={L} (a block's output skips "
             f"forward to a later block's input)")
    if args.attn_proj_init not in ("zero", "uniform"):
        fail(f"--attn_proj_init={args.attn_proj_init!r}; valid values: zero, uniform")
    if args.value_embed_std <= 0 or args.head_init_std < 0:
        fail(f"--value_embed_std={args.value_embed_std} must be > 0 and --head_init_std={args.head_init_std} >= 0")


def parse_skip_pairs(text: str) -> list[tuple[int, int]]:
    """--skip_pairs "3:6,2:7" -> [(3, 6), (2, 7)] (ValueError when malformed)."""
    pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(text)
    return pairs


def skip_connections(args: Hyperparameters) -> list[tuple[int, int]]:
    """(src, dst) per skip weight, in weight order: --skip_pairs, or the U-net's block L-1-i <- block i."""
    if args.skip_pairs:
        return parse_skip_pairs(args.skip_pairs)
    L = args.num_layers
    return [(L - 1 - i, i) for i in range(L // 2, L)]


def parse_layer_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def factorized_blocks(layers: str, num_layers: int) -> set[int]:
    """The blocks a --kron_layers / --ks_layers list names ("" = every block)."""
    return set(parse_layer_list(layers)) if layers.strip() else set(range(num_layers))


def check_block_list(args: Hyperparameters, flag: str, fail):
    """A flag listing blocks ("" = every block) names blocks that exist."""
    try:
        bad = sorted(factorized_blocks(getattr(args, flag), args.num_layers) - set(range(args.num_layers)))
    except ValueError:
        fail(f"--{flag}={getattr(args, flag)!r}: expected comma-separated block indices such as '0,5,11'")
    if bad:
        fail(f"--{flag} names blocks {bad} outside 0..{args.num_layers - 1}")


# -----------------------------------------------------------------------------------------------------------------
# Features: each optional research idea is one file in features/ (README: How the code is laid out). This script
# touches a feature only through the names below, each optional in its file, and calls them in FEATURE_NAMES order:
#   Flags                         dataclass of its flags, joined into Hyperparameters (the flat names users type)
#   MIN_VALUES, UNIT_INTERVAL, NEEDS   joined into the core's tables of the same names (check_ranges, warnings)
#   check(args, fail)             rejects its bad values and combinations (check_config)
#   check_inputs(args)            checks the files it reads before anything is built (check_inputs)
#   on(args) -> bool              the run uses it: its file is written into the record and the checkpoints
#   attention(args, max_seq_len, layer), mlp(args, layer), linear(args, which, in_features, out_features,
#   zero_init), rotary(args, head_dim, max_seq_len, rotated), block(args, layer, max_seq_len), embedding(args,
#   dim), head(embed, args) -> a module, or None for the core's (the first one built wins)
#   install(model, args)          after GPT.__init__ built the core model (so the core's random draw is unchanged)
#   place(model, args, on_gpu, fp8_matmuls)   after place_model's dtypes and FP8 head switch: its own
#   replaces_dense_mlp(args) -> "--flag=value" or None   the flag with which it replaces the dense MLP or its matrices
#   OPTIONAL_BUFFERS              MLP buffers checkpoints may hold or lack (both load into either model)
#   param_groups(model, args) -> {group: [parameters]}   where its parameters go (the rest follow the core's rule)
#   model_parts(model, args) -> [ModelPart]   its lines in describe_model's parameter and FLOP sums
#   trainee(model, optimizers, args, env) -> the module the loss is computed on, or None (the model itself)
#   log_header(log, run, args, env), log_after_training(log, run, args, env, val_data)   its lines in the record
#   mlp_args(args, layer), args_at_step(args, step) -> args   the flags as one block's MLP / a step's model sees them
#   gated(role, args, index) -> a module weighing a core term per token (roles: x0, bigram, skip, xsa, dc,
#                                head_scale), or None for the core's static form
#   ADAM_GROUPS, adam_lrs(args) -> {group: lr}   Adam groups of its own (their params from its param_groups)
#   SMALL_ADAM_GROUPS             Adam groups of its own at --adam_group_lr's LR (else scalar_lr)
#   RECORD_BF16_GROUPS, record_fp32_params(model)   what --param_dtype=record stores in bf16, and the exceptions
#   train_batches(args, rank, world_size, device, start_step) -> its steps' batches in place of the core's, and
#   require_train_data(files, args)   its check that the shards hold the run's batches (both, when it is on)
#   adam(groups, args) -> an optimizer over adam_param_groups' groups, or None for torch's Adam
#   muon_splits(model, args) -> {parameter: muon_pieces split}   matrices Muon orthogonalizes in pieces
#   muon_normalizer(args) -> a normalizer of Muon's orthogonalized updates: (X, states, piece) -> X, and
#                            state_shapes(pieces) -> {state key: shape}; or None
#   optimizer_hooks(model, adam, muon, args, world_size)   hooks on the optimizers' steps
#   per_step(model, args, env) -> an object whose at(step, optimizers, micro_batches, window) runs before each step
#   val_log(model) -> str        appended to each validation line
#   train_loss(args) -> module or None   the training loss in place of next-token CE (validation stays CE)
#   schedule(model, args, device) -> an object whose set(step) writes the step's values in place (no recompiles)
#   MLP_ACTS, activation(name, width) -> module or None   --mlp_act values of its own and their activation modules
#   ORTHOGONALIZERS = {name: fn(G, steps)}   --muon_ns values of its own: Muon's orthogonalization
#   head_hooks(attn, args, layer)   fills PassThrough hooks of a block's HeadAttention (ve gate, key offset, DC, XSA...)
#   LOOKS_BACK = "--flag"         it reads the previous token: decoding with a KV cache refuses it
#   ATTENTION_NAME                 how messages name the attention its attention socket builds (no per-head hooks)
#   masks(args) -> {name: build(inputs)}   masks its modules read (sources["masks"][name]), built once per forward
#   window_masks(args) -> {name: SequenceMasks}   blocks that read their window masks over a sequence of its own
#   NO_KV_CACHE = "--flag"        decoding with a KV cache cannot serve it (a mask the cache does not build)
#   score_flops(model, args) -> [(label, flops per token)]   attention work it adds, in describe_model's scores
#   head_kind(args) -> str or None   how describe_model names the head (else "untied")
#   architecture_notes(args) -> [str]   its settings at the end of describe_model's architecture line
#   WEIGHT_INITS = {name: fn(model) -> model}   --weight_init values of its own (build_model redraws with it)
#   ATTN_LAMBDAS = {name: (scale_qk, mix_values, scale_output, l1 init)}   --attn_lambdas forms of its own
# A feature imports this module (from train_gpt import ...), never the reverse; one that needs another says so in
# REQUIRES (a tuple of feature names, checked by tests/core/test_layout.py).
SOCKETS = (  # every name above; feature_hooks refuses any other
           "Flags", "MIN_VALUES", "UNIT_INTERVAL", "NEEDS", "REQUIRES", "check", "check_inputs", "on", "attention",
           "mlp", "linear", "rotary", "block", "embedding", "head", "activation", "train_loss", "head_hooks", "gated",
           "install", "place", "replaces_dense_mlp", "OPTIONAL_BUFFERS", "MLP_ACTS", "ORTHOGONALIZERS", "param_groups",
           "ADAM_GROUPS", "adam_lrs", "SMALL_ADAM_GROUPS", "RECORD_BF16_GROUPS", "record_fp32_params", "masks",
           "window_masks", "LOOKS_BACK", "NO_KV_CACHE", "head_kind", "architecture_notes", "WEIGHT_INITS",
           "ATTN_LAMBDAS", "ATTENTION_NAME", "adam", "muon_splits", "muon_normalizer", "optimizer_hooks", "per_step",
           "schedule", "train_batches", "require_train_data", "trainee", "model_parts", "score_flops", "log_header",
           "log_after_training", "val_log", "mlp_args", "args_at_step")
FEATURE_NAMES = (  # a feature comes after those it REQUIRES; the first whose module socket builds one wins
    "polar_express", "learned_gelu", "mot", "distill", "moe", "kronecker", "ks", "fp8_mlp", "mla", "paired_heads",
    "yarn", "ve_gate", "smear", "bigram", "skip_gate", "backout", "attn_input_skips", "key_offset", "dc", "xsa",
    "attn_gate", "mudd", "sublayer", "mtp", "untie", "dropout", "neftune", "truncated_init", "cautious_adam",
    "normuon", "bos_align", "output_lambda", "muon_qk_pairs",
    "tied_embeddings")
FEATURES: list = []  # the imported modules, filled at the end of this file (they import the definitions above it)


def feature_hooks(name: str) -> list:
    """Every feature's function (or table) of one socket, in FEATURE_NAMES order. A name a feature imported from
    this module (moe.py's `activation`) is the core's own, not a socket of the feature."""
    assert name in SOCKETS, f"{name} is not a socket (SOCKETS)"
    core = sys.modules[__name__]
    return [getattr(f, name) for f in FEATURES if hasattr(f, name) and getattr(f, name) is not getattr(core, name, f)]


def built_by_feature(socket: str, *args):
    """The module the first feature that builds one at this socket returns (None: the core builds its own)."""
    for build in feature_hooks(socket):
        module = build(*args)
        if module is not None:
            return module
    return None


def gated_or(role: str, args: Hyperparameters, index: int, default) -> nn.Module:
    """The module a feature builds to weigh `role` of block (or skip) `index` per token (its gated socket;
    --mudd_gate_block), else default()."""
    built = built_by_feature("gated", role, args, index)
    return default() if built is None else built


def features_on(args: Hyperparameters) -> list:
    """The features this run uses (their on(args)): their files go into the record and the checkpoints."""
    return [f for f in FEATURES if hasattr(f, "on") and f.on(args)]


def feature_with(socket: str, args: Hyperparameters):
    """The first feature this run uses that fills `socket` (its attention without hooks, its loader), or None."""
    return next((f for f in features_on(args) if hasattr(f, socket)), None)


def feature_file(feature) -> str:
    return f"features/{feature.__name__.rsplit('.', 1)[-1]}.py"


def load_features() -> list:
    return [importlib.import_module(f"features.{name}") for name in FEATURE_NAMES]


# -----------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE; plain `python train_gpt.py` is a world of one with no process group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return DistEnv(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistEnv(rank, world_size, local_rank, device)


def all_reduce_sum_(t: Tensor, world_size: int):
    if world_size > 1:
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------------------------------------------
# Kernels and optimizer: FP8 head matmul, Muon


def _to_fp8(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return t.mul(scale).to(dtype)


# The op bodies are opaque to the model's torch.compile, so the scale-and-cast passes get their own compiled
# kernels on GPU (one fused read-scale-cast-write each). On CPU they stay eager: tests need no inductor here.
_to_fp8_compiled = torch.compile(_to_fp8, dynamic=False)


def to_fp8(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return (_to_fp8_compiled if t.is_cuda else _to_fp8)(t, scale, dtype)


@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_scale: float, w_scale: float,
           grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # x (N, D) @ w (V, D)^T in e4m3 with per-tensor scales; also returns the fp8 operands for the backward.
    x_f8 = to_fp8(x, x_scale, torch.float8_e4m3fn)
    w_f8 = to_fp8(w, w_scale, torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.t(), out_dtype=torch.bfloat16, use_fast_accum=True,
                           scale_a=x.new_tensor(1 / x_scale, dtype=torch.float32),
                           scale_b=x.new_tensor(1 / w_scale, dtype=torch.float32))
    return out, x_f8, w_f8


@fp8_mm.register_fake
def _(x, w, x_scale, w_scale, grad_scale):
    return x @ w.t(), x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)


@torch.library.custom_op("speedrun::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                    grad_scale: float) -> tuple[Tensor, Tensor]:
    # Gradients in e5m2 (wider range); _scaled_mm wants a row-major first and a column-major second operand.
    g_f8 = to_fp8(g, grad_scale, torch.float8_e5m2)
    inv_g = g.new_tensor(1 / grad_scale, dtype=torch.float32)
    grad_x = torch._scaled_mm(g_f8, w_f8.t().contiguous().t(), out_dtype=torch.bfloat16, use_fast_accum=False,
                              scale_a=inv_g, scale_b=g.new_tensor(1 / w_scale, dtype=torch.float32))
    # grad_w = (x^T g)^T: the (D, V) product keeps the 50,304-long vocab dim as the GEMM's wide output (the
    # record's orientation); the same dot products as g^T x, bitwise equal on CPU (tested).
    grad_w = torch._scaled_mm(x_f8.t().contiguous(), g_f8.t().contiguous().t(), out_dtype=torch.float32,
                              use_fast_accum=False, scale_a=g.new_tensor(1 / x_scale, dtype=torch.float32),
                              scale_b=inv_g).t()
    return grad_x, grad_w


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_scale, w_scale, grad_scale):
    return x_f8.to(torch.bfloat16), w_f8.t().contiguous().t().to(torch.float32)  # grad_w is a transposed view


def _fp8_mm_setup_context(ctx, inputs, output):
    _, _, x_scale, w_scale, grad_scale = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = (x_scale, w_scale, grad_scale)


def _fp8_mm_backward(ctx, grad_out, *_):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = fp8_mm_backward(grad_out.contiguous(), x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup_context)

# The recipe's FP8 head scales: inputs are RMS-normed (~1), head weights small, logit gradients tiny.
FP8_HEAD_SCALES = dict(x_scale=2.0, w_scale=2.0 ** 9, grad_scale=2.0 ** 19)


def zeropower_via_newtonschulz5(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalize each matrix in G (..., rows, cols): quintic Newton-Schulz, bf16 on GPU.

    The coefficients (3.4445, -4.7750, 2.0315) trade exact convergence for speed: singular values land in roughly
    [0.7, 1.2] instead of exactly 1, which training does not mind.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()  # CPU bf16 matmul is emulated and ~10x slower than fp32
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


ORTHOGONALIZERS = dict(quintic=zeropower_via_newtonschulz5)  # --muon_ns; features add theirs (polar_express)


def muon_pieces(X: Tensor, split: tuple) -> list[Tensor]:
    """Views that partition X (k, *shape), a stack of one Muon group's k updates, into the batches of matrices
    Muon orthogonalizes: X itself (split ()), or for split (count, rows) (--muon_qk_pairs) the first `count`
    matrices of each (n, R, C) parameter cut into row blocks of `rows`, (k, count, R / rows, rows, C), followed by
    its other n - count matrices whole (a 2-D parameter is a stack of n = 1)."""
    if not split:
        return [X]
    count, rows = split
    X = X if X.ndim == 4 else X.unsqueeze(1)
    blocks = X[:, :count].unflatten(-2, (-1, rows))
    return [blocks, X[:, count:]] if X.size(1) > count else [blocks]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for the 2-D (and stacked 2-D) matrices inside the blocks.

    Parameters are grouped by shape so each group's updates are orthogonalized as one batch. The work is dealt
    round-robin: rank r owns parameters r, r + world_size, ... of every group (shares differ by at most one), keeps
    their momentum and orthogonalizes their updates; then an all-gather brings every rank every update. Each
    group's gather is asynchronous and overlaps the next group's Newton-Schulz; momentum of parameters a rank does
    not own is neither computed nor stored (gather_momentum() collects it for a checkpoint). With grad_sync set,
    each group waits only for its own gradients' all-reduce (GradientSync), so those overlap the work too.
    """

    def __init__(self, params, lr: float, momentum: float, ns_steps: int = 5, rank: int = 0, world_size: int = 1,
                 lr_mults: dict | None = None, weight_decay: float = 0.0, splits: dict | None = None):
        """lr_mults: {parameter: extra LR factor} (default 1); splits: {parameter: muon_pieces split} for the
        parameters orthogonalized in pieces (--muon_qk_pairs: features/muon_qk_pairs.py; default whole). Parameters are
        grouped by (shape, factor, split)."""
        params, lr_mults, splits = list(params), lr_mults or {}, splits or {}
        key = lambda p: (tuple(p.shape), lr_mults.get(p, 1.0), tuple(splits.get(p, ())))
        keys = sorted({key(p) for p in params}, key=lambda k: (-math.prod(k[0]), k))
        groups = [dict(params=[p for p in params if key(p) == k], lr_mult=k[1], split=k[2]) for k in keys]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay))
        self.rank, self.world_size = rank, world_size
        self.orthogonalize = zeropower_via_newtonschulz5
        # a normalizer of the orthogonalized updates, with optimizer state per piece (--normuon_beta2: NorMuon)
        self.normalize = None
        self.grad_sync = None  # a GradientSync when gradients are still being summed over ranks at step()

    def owned(self, params: list) -> list:
        return params[self.rank::self.world_size]

    @torch.no_grad()
    def step(self):
        pending = []
        for group in self.param_groups:
            params, momentum = group["params"], group["momentum"]
            mine = self.owned(params)
            if self.grad_sync is not None:
                self.grad_sync.wait(mine)
            updates = []
            for p in mine:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                updates.append(p.grad.lerp_(buf, momentum))  # Nesterov
            share = math.ceil(len(params) / self.world_size)
            ortho = torch.zeros((share, *params[0].shape), dtype=torch.bfloat16, device=params[0].device)
            if mine:
                split, states = group.get("split", ()), [self.state[p] for p in mine]  # .get: older checkpoints
                pieces = zip(muon_pieces(torch.stack(updates), split), muon_pieces(ortho[:len(mine)], split))
                for i, (update, out) in enumerate(pieces):
                    mine_ortho = self.orthogonalize(update, group["ns_steps"])
                    if self.normalize is not None:
                        mine_ortho = self.normalize(mine_ortho, states, i)
                    out.copy_(mine_ortho)
            if self.world_size == 1:
                self._apply(group, params, ortho)
                continue
            gathered = torch.empty((self.world_size * share, *params[0].shape), dtype=ortho.dtype,
                                   device=ortho.device)
            handle = dist.all_gather_into_tensor(gathered, ortho, async_op=True)
            pending.append((group, params, gathered, handle))
        for group, params, gathered, handle in pending:
            handle.wait()
            # rank r's j-th update (row r * share + j) belongs to params[j * world_size + r]
            share = len(gathered) // self.world_size
            order = gathered.view(self.world_size, share, *gathered.shape[1:]).transpose(0, 1).flatten(0, 1)
            self._apply(group, params, order)

    @staticmethod
    def _apply(group: dict, params: list, ortho: Tensor):
        rows, cols = params[0].shape[-2:]
        eta = group["lr"] * max(1.0, rows / cols) ** 0.5 * group.get("lr_mult", 1.0)  # .get: older checkpoints
        decay = group.get("weight_decay", 0.0) * group["lr"] * eta  # cautious: only where the update agrees with W's sign
        for p, u in zip(params, ortho):
            u = u.to(p.dtype)
            if decay:
                p.sub_(p * (u * p >= 0), alpha=decay)
            p.add_(u, alpha=-eta)

    def state_shapes(self, p: Tensor, split: tuple = ()) -> dict:
        """Shapes of p's optimizer state: the momentum, and the normalizer's per piece of muon_pieces (NorMuon's v)."""
        shapes = {"momentum_buffer": tuple(p.shape)}
        if self.normalize is not None:
            shapes |= self.normalize.state_shapes(muon_pieces(torch.empty((1, *p.shape), device="meta"), split))
        return shapes

    @torch.no_grad()
    def gather_momentum(self):
        """Collective: give every rank the optimizer state (momentum, NorMuon's v) of every parameter, which only
        its owner keeps, so a checkpoint holds the whole state."""
        if self.world_size == 1:
            return
        for group in self.param_groups:
            params = group["params"]
            share = math.ceil(len(params) / self.world_size)
            for key, shape in self.state_shapes(params[0], group.get("split", ())).items():  # the same on every rank
                local = torch.zeros((share, *shape), dtype=params[0].dtype, device=params[0].device)
                for j, p in enumerate(self.owned(params)):
                    if key in self.state[p]:
                        local[j] = self.state[p][key]
                gathered = torch.empty((self.world_size * share, *shape), dtype=local.dtype, device=local.device)
                dist.all_gather_into_tensor(gathered, local)
                for i, p in enumerate(params):  # params[i] is rank (i % world_size)'s (i // world_size)-th
                    row = (i % self.world_size) * share + i // self.world_size
                    self.state[p][key] = gathered[row].clone()


class GradientSync:
    """Sums gradients over ranks without waiting for the whole backward: a hook on each parameter starts its
    asynchronous all-reduce as soon as the last micro-batch's gradient is accumulated into it, and the optimizers
    wait (wait(params)) only for the gradients they are about to read. Only built when world_size > 1."""

    def __init__(self, params: list):
        self.params, self.armed, self.handles = params, False, {}
        # Gradients that keep accumulating locally across steps (Adam stepped every --adam_every steps): reduced
        # once, in the step their optimizer steps, so each rank's sum is added over ranks exactly once.
        self.deferred = set()
        for p in params:
            p.register_post_accumulate_grad_hook(self._reduce)

    def _reduce(self, p: Tensor):
        if self.armed and p not in self.deferred:
            self.handles[p] = dist.all_reduce(p.grad, async_op=True)

    def wait(self, params):
        for p in params:
            handle = self.handles.pop(p, None)
            if handle is not None:
                handle.wait()

    def add(self, params: list):
        """Parameters created after the optimizers (the distillation projection)."""
        for p in params:
            p.register_post_accumulate_grad_hook(self._reduce)
        self.params = self.params + list(params)

    def reduce_rest(self):
        """After the last backward: start the all-reduce of every gradient no hook reached (one whose last
        accumulation came in an earlier micro-batch), in parameter order, then disarm. Collectives must be issued
        in the same order on every rank: every rank runs the same graph, so its hooks fire in the same order."""
        for p in self.params:
            if p.grad is not None and p not in self.handles and p not in self.deferred:
                self.handles[p] = dist.all_reduce(p.grad, async_op=True)
        self.armed = False


# -----------------------------------------------------------------------------------------------------------------
# Model blocks

BLOCK_SIZE = 128  # FlexAttention tile and the unit of sliding windows
EOT_TOKEN = 50256  # GPT-2 end of text; it precedes every document
GPT2_VOCAB = 50257  # GPT-2 token ids (the --mot byte table has a row for each)


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype (bf16 on GPU) in forward."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.use_fp8 = False  # set by main() for the lm_head on GPUs with FP8 support
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                bound = 3 ** 0.5 * 0.5 * in_features ** -0.5  # uniform with std 0.5 / sqrt(fan_in)
                self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            flat = x.flatten(0, -2)
            out = fp8_mm(flat, self.weight, **FP8_HEAD_SCALES)[0]
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))


WEIGHT_INITS = dict(uniform=lambda model: model)  # --weight_init, in build_model; features add theirs (truncated)


def document_ids(inputs: Tensor) -> Tensor:
    return (inputs == EOT_TOKEN).cumsum(0)


def in_window(block_distance, window_blocks, halvings: int = 0):
    """Key block `block_distance` (>= 0) blocks before the query block is one of the last max(window_blocks >>
    halvings, 1) blocks. The clamp is written as `or distance == 0` and the halving happens here, on the raw
    window, so a compiled mask_mod captures only the window tensor the caller passed: inductor's CPU FlexAttention
    cannot lower a mask that captures a computed (pointwise) buffer such as window.clamp_min(1)."""
    return (block_distance < (window_blocks >> halvings)) | (block_distance == 0)


def in_token_window(distance, window_blocks, halvings: int = 0):
    """--window_unit=token: key `distance` (>= 0) tokens before the query is at most 128 max(window_blocks >>
    halvings, 1) tokens back, FA3's window_size=(128 W, 0): 128 W + 1 keys. Clamped as in_window, for the same
    reason (only the caller's window tensor is captured)."""
    return (distance <= (window_blocks >> halvings) * BLOCK_SIZE) | (distance <= BLOCK_SIZE)


# --window_unit -> whether key kv_idx lies in query q_idx's window (kv_idx <= q_idx; documents aside)
WINDOW_RULES = dict(
    block=lambda q_idx, kv_idx, window_blocks, halvings: in_window(q_idx // BLOCK_SIZE - kv_idx // BLOCK_SIZE,
                                                                   window_blocks, halvings),
    token=lambda q_idx, kv_idx, window_blocks, halvings: in_token_window(q_idx - kv_idx, window_blocks, halvings))


def doc_causal_window_mask(docs: Tensor, window_blocks, halvings: int = 0, unit: str = "block"):
    """The one attention mask definition, shared by FlexAttention and the dense CPU path.

    Query i sees key j iff j <= i, both lie in the same document, and j is in i's window of max(window_blocks >>
    halvings, 1) (halvings=1: the short window): j's 128-block is one of that many blocks up to and including
    i's block (unit "block"), or i - j <= 128 times that many (unit "token", --window_unit).
    """
    near = WINDOW_RULES[unit]

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])
                & near(q_idx, kv_idx, window_blocks, halvings))
    return mask_mod


def doc_causal_token_window_mask(docs: Tensor, tokens: int):
    """Query i sees key j iff i - tokens < j <= i and both lie in the same document: a window counted in tokens,
    not blocks (--dc_layers' 112)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & (q_idx - kv_idx < tokens)
    return mask_mod


def dense_token_window_mask(inputs: Tensor, tokens: int) -> Tensor:
    """(T, T) boolean doc_causal_token_window_mask for scaled_dot_product_attention."""
    docs = document_ids(inputs)
    idx = torch.arange(len(docs), device=docs.device)
    return doc_causal_token_window_mask(docs, tokens)(0, 0, idx[:, None], idx[None, :])


def flex_token_window_mask(inputs: Tensor, tokens: int) -> BlockMask:
    """doc_causal_token_window_mask as a FlexAttention BlockMask: each query block visits the key blocks the window
    can reach (its own and the ceil((tokens - 1) / 128) before it) that share a document with it, all partial (the
    window cuts through them). Equals dense_token_window_mask (tested)."""
    docs = document_ids(inputs)
    n = len(docs) // BLOCK_SIZE
    blocks = torch.arange(n, device=docs.device)
    q, kv = blocks[:, None], blocks[None, :]
    first, last = docs.view(n, BLOCK_SIZE)[:, 0], docs.view(n, BLOCK_SIZE)[:, -1]
    reach = -(-(tokens - 1) // BLOCK_SIZE)
    counts, indices = kv_block_lists((q >= kv) & (q - kv <= reach) & (first[:, None] <= last[None, :]))
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=BLOCK_SIZE,
                                    mask_mod=doc_causal_token_window_mask(docs, tokens))


def dense_attention_mask(inputs: Tensor, window_blocks, docs: Tensor | None = None, halvings: int = 0,
                         unit: str = "block") -> Tensor:
    """(T, T) boolean mask for scaled_dot_product_attention, evaluated from the same mask_mod. docs: per-position
    document ids given directly (--mot=cross+self's byte stream, the doubled sequence of --paired_head_layers)
    instead of from the tokens."""
    docs = document_ids(inputs) if docs is None else docs
    idx = torch.arange(len(docs), device=docs.device)
    return doc_causal_window_mask(docs, window_blocks, halvings, unit)(0, 0, idx[:, None], idx[None, :])


def kv_block_lists(visited: Tensor) -> tuple[Tensor, Tensor]:
    """(q blocks, kv blocks) bool -> BlockMask's (counts, indices): per query block how many kv blocks, and which
    (visited ones first), shaped (1, 1, ...)."""
    counts = visited.sum(-1, dtype=torch.int32)
    indices = torch.argsort(visited.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def flex_block_mask(inputs: Tensor, window_blocks, docs: Tensor | None = None, halvings: int = 0,
                    unit: str = "block") -> BlockMask:
    """Block-sparse FlexAttention mask from per-block document ranges, so fully masked blocks are skipped and
    fully visible blocks skip the mask_mod. Equals dense_attention_mask (tested)."""
    docs = document_ids(inputs) if docs is None else docs
    n = len(docs) // BLOCK_SIZE
    blocks = torch.arange(n, device=docs.device)
    q, kv = blocks[:, None], blocks[None, :]
    first, last = docs.view(n, BLOCK_SIZE)[:, 0], docs.view(n, BLOCK_SIZE)[:, -1]
    # the window admits some pair of (q, kv) iff it admits their nearest pair, every pair iff their farthest (both
    # rules widen with the distance): unit "block" admits whole blocks; "token" also cuts the block just beyond
    near, start = WINDOW_RULES[unit], blocks * BLOCK_SIZE
    visible = (q >= kv) & near(start[:, None], start[None, :] + BLOCK_SIZE - 1, window_blocks, halvings)
    inside = near(start[:, None] + BLOCK_SIZE - 1, start[None, :], window_blocks, halvings)
    # docs are non-decreasing, so for kv <= q some pair shares a document iff kv's last doc reaches q's first doc,
    # and every pair does iff both blocks lie inside one document (and kv < q, so no pair is acausal).
    some = visible & (first[:, None] <= last[None, :])
    every = visible & inside & (q > kv) & (last[:, None] == first[None, :])
    partial_counts, partial_idx = kv_block_lists(some & ~every)
    full_counts, full_idx = kv_block_lists(every)
    return BlockMask.from_kv_blocks(partial_counts, partial_idx, full_counts, full_idx, BLOCK_SIZE=BLOCK_SIZE,
                                    mask_mod=doc_causal_window_mask(docs, window_blocks, halvings, unit))


# FlexAttention has no backward on CPU, so CPU runs use dense SDPA masks. Tests and tools/preflight.py set this to
# run the GPU's BlockMask path on CPU (compiled forward: inductor does compile FlexAttention there).
FLEX_ATTENTION_ON_CPU = False


def mask_builder(x: Tensor):
    """flex_block_mask on GPU (or with FLEX_ATTENTION_ON_CPU), dense_attention_mask otherwise (both take unit=, the
    --window_unit that GPT stores at build time)."""
    return flex_block_mask if x.is_cuda or FLEX_ATTENTION_ON_CPU else dense_attention_mask


def token_window_mask_builder(x: Tensor):
    """flex_token_window_mask on GPU (or with FLEX_ATTENTION_ON_CPU), dense_token_window_mask otherwise."""
    return flex_token_window_mask if x.is_cuda or FLEX_ATTENTION_ON_CPU else dense_token_window_mask


@dataclass(frozen=True)
class SequenceMasks:
    """Window masks that `blocks` read over a sequence of a feature's own in place of the tokens' (its window_masks
    socket; --paired_head_layers: the doubled sequence): document_ids(inputs) gives the document of each of its
    positions, positions_per_token its length in tokens' lengths. Causal and windowed in its own positions."""
    blocks: tuple
    document_ids: object  # (inputs: Tensor) -> Tensor
    positions_per_token: int


class KVCache:
    """Inference cache for tools/sample.py: each attention layer's keys and values so far, in call order. Passed to
    GPT.hidden(cache=...) in place of the masks; attend() appends to it and masks new queries against every cached
    key with the same doc_causal_window_mask as training (absolute positions, documents split at EOT, the model's
    --window_unit)."""

    def __init__(self):
        self.keys, self.values, self.docs, self.layer = [], [], None, 0
        self.length = 0  # tokens already cached (the absolute position of the next token)

    def begin(self, inputs: Tensor, window_blocks, unit: str = "block") -> dict:
        docs = document_ids(inputs) + (self.docs[-1] if self.docs is not None else 0)
        self.docs = docs if self.docs is None else torch.cat([self.docs, docs])
        self.layer, self.new_tokens = 0, len(inputs)
        return {"L": KVCacheWindow(self, max(int(window_blocks), 1), unit),
                "S": KVCacheWindow(self, max(int(window_blocks) // 2, 1), unit)}

    def end(self):
        self.length += self.new_tokens

    def clone(self) -> "KVCache":
        other = KVCache()
        other.keys, other.values, other.docs, other.length = list(self.keys), list(self.values), self.docs, self.length
        return other


@dataclass
class KVCacheWindow:
    cache: KVCache
    window_blocks: int
    unit: str = "block"  # --window_unit

    @property
    def offset(self) -> int:
        return self.cache.length

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        c, i = self.cache, self.cache.layer
        if i == len(c.keys):
            c.keys.append(k), c.values.append(v)
        else:
            c.keys[i], c.values[i] = torch.cat([c.keys[i], k], dim=2), torch.cat([c.values[i], v], dim=2)
        c.layer += 1
        q_idx = torch.arange(c.length, c.length + q.size(2), device=q.device)
        kv_idx = torch.arange(c.keys[i].size(2), device=q.device)
        mask_mod = doc_causal_window_mask(c.docs, self.window_blocks, unit=self.unit)
        mask = mask_mod(0, 0, q_idx[:, None], kv_idx[None, :])
        return F.scaled_dot_product_attention(q, c.keys[i], c.values[i], attn_mask=mask, scale=scale,
                                              enable_gqa=c.keys[i].size(1) != q.size(1))


def rotary_offset(mask) -> int:
    """Absolute position of the first query: 0 in training, the cached length when decoding."""
    return mask.offset if isinstance(mask, KVCacheWindow) else 0


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q (1, heads, T, qk_dim), k (1, kv_heads, T, qk_dim), v (1, kv_heads, T, v_dim); fewer kv_heads than heads
    (dividing them) is grouped-query attention. FlexAttention on GPU; on CPU (no FlexAttention backward) dense SDPA;
    a KVCacheWindow when decoding."""
    gqa = k.size(1) != q.size(1)
    if isinstance(mask, KVCacheWindow):
        return mask.attend(q, k, v, scale)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Rotary(nn.Module):
    """Rotary embedding on `rotated` of the head dims (default half): rotated/2 frequencies from 1 down to 1/1024;
    the remaining pairs get frequency zero (unrotated). canonical (--rope=canonical): every dim rotated, frequencies
    10000^(-2k/head_dim)."""

    def __init__(self, head_dim: int, max_seq_len: int, rotated: int | None = None, canonical: bool = False):
        super().__init__()
        self.head_dim, self.max_seq_len, self.canonical = head_dim, max_seq_len, canonical
        self.rotated = head_dim if canonical else head_dim // 2 if rotated is None else rotated
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), self.frequencies())
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def frequencies(self) -> Tensor:
        if self.canonical:
            return 10000.0 ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=self.rotated // 2, dtype=torch.float32)
        return torch.cat([freqs, freqs.new_zeros(self.head_dim // 2 - self.rotated // 2)])

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:  # x: (B, T, heads, head_dim) at positions offset..
        cos = self.cos[None, offset:offset + x.size(1), None, :]
        sin = self.sin[None, offset:offset + x.size(1), None, :]
        return self.rotate(x, cos, sin)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class PassThrough(nn.Module):
    """A hook whose flag is off: returns its first argument untouched (the others are what the module replacing
    it reads). Parameter-free, so the default model's state and numerics are those of record #21."""

    def forward(self, x: Tensor, *context) -> Tensor:
        return x


def value_lambdas_r21(lambdas: Tensor, v: Tensor, ve: Tensor | None) -> Tensor:
    """#21: v = l0 v + l1 ve (both learned, init 0.5)."""
    return lambdas[0] * v if ve is None else lambdas[0] * v + lambdas[1] * ve


def unscaled_qk(lambdas: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return q, k


def unscaled_output(lambdas: Tensor, out: Tensor) -> Tensor:
    return out


# --attn_lambdas: what the attention's two lambdas multiply, (q and k scale, value mix, output scale, l1's init);
# features add forms of their own (o: features/output_lambda.py)
ATTN_LAMBDAS = dict(ve=(unscaled_qk, value_lambdas_r21, unscaled_output, 0.5))


class HeadAttention(nn.Module):
    """The part multi-head and grouped-query attention share after their projections: RMS-norm and rotary on q and
    k, value-embedding mixing, attention, output projection. Five per-head hooks (PassThrough unless
    install_head_hooks swaps in a module): key_offset on the rotated keys, ve_gate on the value embedding, dc, xsa
    and out_gate on the attention output, in the recipe's order (key offset, v += ve, attention, DC, XSA, gate)."""

    def __init__(self):
        super().__init__()
        self.key_offset, self.ve_gate, self.dc, self.xsa, self.out_gate = (PassThrough() for _ in range(5))
        self.scale_qk, self.mix_values, self.scale_output = ATTN_LAMBDAS["ve"][:3]  # --attn_lambdas

    def values(self, x: Tensor, v: Tensor, ve: Tensor | None) -> Tensor:
        """v mixed with the block's (gated) value embedding by the lambdas (--attn_lambdas)."""
        return self.mix_values(self.lambdas, v, None if ve is None else self.ve_gate(ve.view_as(v), x))

    def rotate_mix_attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ve: Tensor | None, mask,
                          sources: dict | None) -> Tensor:
        B, T = q.shape[:2]  # x (B, T, dim) normed input; q (B, T, heads, head_dim); k, v (B, T, kv_heads, head_dim)
        offset = rotary_offset(mask)
        q, k = self.scale_qk(self.lambdas, q, k)
        q, k = self.rotary(norm(q), offset), self.key_offset(self.rotary(norm(k), offset))
        v = self.values(x, v, ve)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = self.dc(attend(qh, kh, vh, mask, self.attn_scale).transpose(1, 2), qh, kh, vh, self.attn_scale, sources)
        y = self.out_gate(self.xsa(y, v, sources), x, sources).reshape(B, T, -1)
        return self.scale_output(self.lambdas, self.c_proj(y))


class CausalSelfAttention(HeadAttention):
    """Multi-head attention, q, k and v from one merged (3, dim, dim) weight (Muon orthogonalizes each of the 3)."""

    def __init__(self, dim: int, num_heads: int, attn_scale: float, max_seq_len: int, zero_proj: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_scale = num_heads, dim // num_heads, attn_scale
        self.qk_dim = self.v_dim = self.head_dim
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))  # merged q, k, v
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0 * v + l1 * value_embedding
        self.rotary = Rotary(self.head_dim, max_seq_len)
        self.c_proj = CastedLinear(dim, dim, zero_init=zero_proj)  # --attn_proj_init=uniform: zero_proj False

    def forward(self, x: Tensor, ve: Tensor | None, mask, sources: dict | None = None) -> Tensor:
        B, T = x.shape[:2]  # sources: what the per-head hooks may read (MUDD gate values); None without them
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x)).view(B, T, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.chunk(3, dim=-2)
        return self.rotate_mix_attend(x, q, k, v, ve, mask, sources)

    def kv_cache_floats_per_token(self) -> int:
        return 2 * self.num_heads * self.head_dim


class GroupedQueryAttention(HeadAttention):
    """Grouped-query attention (--n_kv_heads): n_kv_heads K/V heads, each shared by num_heads / n_kv_heads query
    heads (1 = multi-query). Separate q (dim, dim) and kv (2, kv_dim, dim) weights; the value embedding it receives
    is kv_dim wide (the tables shrink with the values, see value_embed_dim)."""

    def __init__(self, dim: int, num_heads: int, n_kv_heads: int, attn_scale: float, max_seq_len: int,
                 zero_proj: bool = True):
        super().__init__()
        self.num_heads, self.n_kv_heads, self.head_dim = num_heads, n_kv_heads, dim // num_heads
        self.attn_scale, self.qk_dim, self.v_dim = attn_scale, self.head_dim, self.head_dim
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.q_w = nn.Parameter(torch.empty(dim, dim).uniform_(-bound, bound))
        self.kv_w = nn.Parameter(torch.empty(2, n_kv_heads * self.head_dim, dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0 * v + l1 * value_embedding
        self.rotary = Rotary(self.head_dim, max_seq_len)
        self.c_proj = CastedLinear(dim, dim, zero_init=zero_proj)  # --attn_proj_init=uniform: zero_proj False

    def forward(self, x: Tensor, ve: Tensor | None, mask, sources: dict | None = None) -> Tensor:
        B, T = x.shape[:2]
        q = F.linear(x, self.q_w.type_as(x)).view(B, T, self.num_heads, self.head_dim)
        kv = F.linear(x, self.kv_w.flatten(end_dim=1).type_as(x)).view(B, T, 2 * self.n_kv_heads, self.head_dim)
        k, v = kv.chunk(2, dim=-2)
        return self.rotate_mix_attend(x, q, k, v, ve, mask, sources)

    def kv_cache_floats_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim


def kv_heads(args: Hyperparameters) -> int:
    return args.n_kv_heads or args.num_heads


def value_embed_dim(args: Hyperparameters) -> int:
    """Value-embedding width = the attention's value width: n_kv_heads * head_dim (model_dim without GQA)."""
    return kv_heads(args) * (args.model_dim // args.num_heads)


def window_kinds(args: Hyperparameters) -> list[str]:
    """Per block, "L" (long window) or "S" (short): window_pattern for the first half, mirrored for the second, or
    one letter per block when it has num_layers of them."""
    if len(args.window_pattern) == args.num_layers:
        return list(args.window_pattern)
    half = args.window_pattern[:args.num_layers // 2]
    return list(half + half[::-1])


def value_embed_tables(args: Hyperparameters) -> list[int | None]:
    """Per block, the value-embedding table it reads: tables 0..nve-1 for the first nve blocks and again for the
    last nve, or table k for the k-th block of --value_embed_layers (None: no value embedding)."""
    L, nve = args.num_layers, args.num_value_embeds
    if args.value_embed_layers:
        listed = parse_layer_list(args.value_embed_layers)
        return [listed.index(i) if i in listed else None for i in range(L)]
    return [i if i < nve else (i - (L - nve) if i >= L - nve else None) for i in range(L)]


def install_head_hooks(attn: HeadAttention, args: Hyperparameters, layer: int):
    """Replace the PassThrough hooks of block `layer`'s attention with the modules its flags ask for: the key
    offset on long-window blocks, the value-embedding gate on blocks with a value embedding, XSA on --xsa_layers,
    the output gate everywhere or the MUDD-gated head scale on --mudd_gate_attn_layers (frontier recipe 3.4)."""
    if args.attn_lambdas != "ve":
        attn.scale_qk, attn.mix_values, attn.scale_output, l1 = feature_table("ATTN_LAMBDAS", {})[args.attn_lambdas]
        with torch.no_grad():
            attn.lambdas[1] = l1
    # a feature may scale the heads' outputs per token (gated: --mudd_gate_block)
    head_scale = built_by_feature("gated", "head_scale", args, layer)  # --attn_gate's sigmoid gate gives way to it
    if head_scale is not None:
        attn.out_gate = head_scale
    for hooks in feature_hooks("head_hooks"):  # --ve_gate, --key_offset, --dc_layers, --xsa_layers, --attn_gate
        hooks(attn, args, layer)


def build_attention(args: Hyperparameters, max_seq_len: int, layer: int | None = None) -> nn.Module:
    """A block's attention: a feature's (--mla_kv_rank > 0: features/mla.py, --paired_head_layers:
    features/paired_heads.py), grouped-query (--n_kv_heads < num_heads) or the baseline.
    layer: the block's index, for the per-block hooks of install_head_hooks (None: no hooks)."""
    attn = built_by_feature("attention", args, max_seq_len, layer)
    if attn is None and kv_heads(args) != args.num_heads:
        attn = GroupedQueryAttention(args.model_dim, args.num_heads, args.n_kv_heads, args.attn_scale, max_seq_len,
                                     zero_proj=args.attn_proj_init == "zero")
    elif attn is None:
        attn = CausalSelfAttention(args.model_dim, args.num_heads, args.attn_scale, max_seq_len,
                                   zero_proj=args.attn_proj_init == "zero")
    r = attn.rotary  # a variant of the same shape replaces it: a feature's (--yarn: features/yarn.py), --rope's
    variant = built_by_feature("rotary", args, r.head_dim, r.max_seq_len, r.rotated)
    if variant is None and args.rope != "half":
        variant = Rotary(r.head_dim, r.max_seq_len, r.rotated, canonical=True)
    if variant is not None:
        attn.rotary = variant
    if layer is not None and isinstance(attn, HeadAttention):  # MLA has no per-head hooks (refuse_without_head_hooks)
        install_head_hooks(attn, args, layer)
    return attn


def mlp_linear(args: Hyperparameters, which: str, in_features: int, out_features: int, zero_init: bool):
    """c_fc / c_proj ("fc" / "proj"): a dense CastedLinear, or the factorized layer a feature builds there
    (--kron_mlp: features/kronecker.py, --ks_mlp: features/ks.py)."""
    built = built_by_feature("linear", args, which, in_features, out_features, zero_init)
    return CastedLinear(in_features, out_features, zero_init=zero_init) if built is None else built


class ReLU2(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class GatedSiLU(nn.Module):
    """silu(gate) * up for an input (..., 2 * width) laid out [gate | up]: the SwiGLU activation of MoE experts,
    whose c_fc is twice as wide."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


MLP_ACTS = ("relu2", "gelu", "swiglu")  # dense swiglu is its own module, SwiGLUMLP; features add theirs (MLP_ACTS)


def activation(name: str, width: int) -> nn.Module:
    """The MLP's activation --mlp_act names: the core's, or the one a feature builds (learned_gelu: its file)."""
    built = built_by_feature("activation", name, width)
    return {"relu2": ReLU2, "gelu": nn.GELU, "swiglu": GatedSiLU}[name]() if built is None else built


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, hidden = args.model_dim, args.mlp_ratio * args.model_dim
        self.c_fc = mlp_linear(args, "fc", dim, hidden, zero_init=False)
        self.act = activation(args.mlp_act, hidden)
        self.c_proj = mlp_linear(args, "proj", hidden, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # A feature's MLP state (OPTIONAL_BUFFERS: --fp8_mlp's scales) is optional in both directions, so checkpoints
        # with and without it (the same parameters) load into either model: a dense MLP drops it, an MLP with those
        # buffers and no saved values starts them fresh.
        for name in feature_table("OPTIONAL_BUFFERS", ()):
            if name in self._buffers:
                state_dict.setdefault(prefix + name, torch.zeros_like(self._buffers[name]))
            else:
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args)


def swiglu_hidden(args: Hyperparameters) -> int:
    return max(128, round(2 * args.mlp_ratio * args.model_dim / 3 / 128) * 128)


class SwiGLUMLP(nn.Module):
    """c_proj(silu(gate) * up), gate and up from one merged (2, hidden, dim) weight. hidden = 2/3 of the dense MLP's
    rounded to a multiple of 128, so the parameters match the dense MLP (exactly at dim 768: hidden 2048)."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, hidden = args.model_dim, swiglu_hidden(args)
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.fc_w = nn.Parameter(torch.empty(2, hidden, dim).uniform_(-bound, bound))
        self.c_proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.fc_w.flatten(end_dim=1).type_as(x)).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


def block_mlp_args(args: Hyperparameters, layer: int) -> Hyperparameters:
    """args as block `layer`'s MLP sees them (each feature's mlp_args: --kron_mlp off in the blocks --kron_layers
    leaves out, ...)."""
    for for_block in feature_hooks("mlp_args"):
        args = for_block(args, layer)
    return args


def build_mlp(args: Hyperparameters, layer: int | None = None) -> nn.Module:
    """A block's MLP: mixture of experts (--moe_experts > 0; Kronecker experts with --kron_mlp=both), SwiGLU, or the
    dense MLP with --mlp_act (matrices factorized per --kron_mlp/--ks_mlp; in FP8 with --fp8_mlp: features/fp8_mlp.py).
    layer: the block's index, for --kron_layers/--ks_layers
    (None: as if every block were listed)."""
    if layer is not None:
        args = block_mlp_args(args, layer)
    built = built_by_feature("mlp", args, layer)  # --moe_experts: features/moe.py, --fp8_mlp: features/fp8_mlp.py
    if built is not None:
        return built
    return SwiGLUMLP(args) if args.mlp_act == "swiglu" else MLP(args)


class Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int, max_seq_len: int):
        super().__init__()
        has_attn = layer not in parse_layer_list(args.no_attn_layers)
        self.attn = build_attention(args, max_seq_len, layer) if has_attn else None
        self.attn_input = PassThrough()  # its own residual, or an earlier block's (--attn_input_skips: install)
        self.mlp = build_mlp(args, layer)
        # x = l0 * x + l1 * x0; --resid_lambda_init sets l0 (frontier recipe 3.3, r45: 1.1)
        self.lambdas = nn.Parameter(torch.tensor([args.resid_lambda_init, 0.0]))
        self.dropout = nn.Identity()  # a socket on both branch outputs (--dropout: features/dropout.py)

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mask, sources: dict | None = None) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0  # sources: earlier residuals and gate values (GPT.hidden)
        if self.attn is not None:
            x = x + self.dropout(self.attn(norm(self.attn_input(x, sources)), ve, mask, sources))
        return x + self.dropout(self.mlp(norm(x)))


class LearnedAdd(nn.Module):
    """x + lam t, lam a learned scalar (an Adam scalar)."""

    def __init__(self, init: float):
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor, t: Tensor, sources: dict | None = None) -> Tensor:
        return x + self.lam[0].type_as(x) * t


def build_block(args: Hyperparameters, layer: int, max_seq_len: int) -> nn.Module:
    built = built_by_feature("block", args, layer, max_seq_len)  # --mudd_block, --sublayer_lambdas
    if built is not None:
        return built
    return Block(args, layer, max_seq_len)


# -----------------------------------------------------------------------------------------------------------------
# Model


def next_multiple(n: int, m: int) -> int:
    return -(-n // m) * m


def gpt2_encoding():
    """tiktoken's GPT-2 BPE; without network it needs TIKTOKEN_CACHE_DIR pointing at its cached files."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, a corrupt cache file, ...
        raise SystemExit(f"error: could not load the GPT-2 tokenizer ({type(e).__name__}); tiktoken downloads its BPE "
                         f"files on first use, so without network set TIKTOKEN_CACHE_DIR to a directory that holds "
                         f"them (e.g. ../shared/tiktoken_cache)") from None


def softcap_r21(z: Tensor) -> Tensor:
    return 30 * torch.sigmoid(z / 7.5)


def softcap_frontier(z: Tensor) -> Tensor:
    """Record 54's rescaled cap: logits in (0, 23), the sigmoid shifted so a zero logit starts near 23 * 0.34."""
    return 23 * torch.sigmoid((z + 5) / 7.5)


SOFTCAPS = dict(r21=softcap_r21, frontier=softcap_frontier)  # --softcap


class NextTokenLoss(nn.Module):
    """The training loss of record #21: mean cross-entropy against the next token."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits, targets)


def build_train_loss(args: Hyperparameters) -> nn.Module:
    """#21's next-token loss, or a feature's (--mtp_weights / --prefix_weights: features/mtp.py)."""
    built = built_by_feature("train_loss", args)
    return NextTokenLoss() if built is None else built


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        L, dim, nve = args.num_layers, args.model_dim, args.num_value_embeds
        max_seq_len = max_sequence_length(args)
        padded_vocab = next_multiple(args.vocab_size, 128)
        embed = built_by_feature("embedding", args, dim)  # --tie_embeddings: features/tied_embeddings.py's table
        self.embed = nn.Embedding(args.vocab_size, dim) if embed is None else embed
        self.smear = nn.Identity()  # a socket on the raw embeddings (--smear: features/smear.py installs it)
        self.embed_noise = nn.Identity()  # a socket on the token embeddings (--neftune_alpha: features/neftune.py)
        self.mot = PassThrough()  # x0's socket for byte-level information (--mot: features/mot.py installs it)
        # x = x0 + g * bigram embedding; the blocks' x0 stays the token embedding alone
        self.bigram = PassThrough()  # a socket: x = x0 + g b (--bigram_rows: features/bigram.py installs it)
        # modules that read the previous token, which decoding with a KVCache does not hand them (hidden refuses)
        self.looks_back = [f.LOOKS_BACK for f in features_on(args) if hasattr(f, "LOOKS_BACK")]
        self.value_embeds = nn.ModuleList([nn.Embedding(args.vocab_size, value_embed_dim(args))
                                           for _ in range(nve)])
        if args.value_embed_std != 1.0:  # the same N(0, 1) draw, scaled (frontier recipe 3.2: 0.01)
            with torch.no_grad():
                for ve in self.value_embeds:
                    ve.weight.mul_(args.value_embed_std)
        self.blocks = nn.ModuleList([build_block(args, i, max_seq_len) for i in range(L)])  # --mudd_block: MuddBlock
        # skips: block dst's input += skip_gate(w) * block src's output, one weight per (src, dst) pair: the U-net
        # (block L-1-i <- block i) or --skip_pairs; a socket on the weights (--skip_gate: features/skip_gate.py)
        self.skip_gate = nn.Identity()
        skips = skip_connections(args)
        self.skip_weights = nn.Parameter(torch.ones(len(skips)))
        self.skips_into = [[(w, src) for w, (src, dst) in enumerate(skips) if dst == i] for i in range(L)]
        # a feature may weigh each skip per token too (gated: --mudd_gate_block; parameter-free PassThroughs else)
        scales = [gated_or("skip", args, w, PassThrough) for w in range(len(skips))]
        self.skip_scales = nn.ModuleList(scales) if any(type(m) is not PassThrough for m in scales) else scales
        self.backout = PassThrough()  # a socket before the final norm (--backout_layer: features/backout.py)
        self.kept_outputs = {src for src, _ in skips}  # block outputs that skips (and features' installs) read
        head = built_by_feature("head", self.embed, args)  # --tie_embeddings: the head reads the embedding's table
        self.lm_head = CastedLinear(dim, padded_vocab, zero_init=True) if head is None else head
        if args.head_init_std > 0 and head is None:  # frontier recipe 3.2: N(0, 0.005^2)
            with torch.no_grad():
                self.lm_head.weight.normal_(0.0, args.head_init_std)
        self.vocab_size = args.vocab_size  # real tokens; the head's padding rows are never targets
        self.softcap = SOFTCAPS[args.softcap]
        self.train_loss = build_train_loss(args)  # next-token CE, or a feature's (the weighted MTP/prefix terms)
        self.ve_table = value_embed_tables(args)  # layer -> value-embedding table (None: none)
        self.window_kind = window_kinds(args)
        # blocks that read their window masks over a sequence of a feature's own, "<name>_L" / "<name>_S"
        # (--paired_head_layers: the doubled sequence, "paired_L" / "paired_S"); the others the tokens' "L" / "S"
        self.sequence_masks = {name: seq for make in feature_hooks("window_masks") for name, seq in make(args).items()}
        self.mask_key = [next((f"{name}_{kind}" for name, seq in self.sequence_masks.items() if i in seq.blocks), kind)
                         for i, kind in enumerate(self.window_kind)]
        self.window_unit = args.window_unit  # which window rule every mask (and a KVCache) applies: WINDOW_RULES
        # masks a feature's modules read besides the windows (--dc_layers: "dc"), built once per forward
        self.extra_masks = {name: build for make in feature_hooks("masks") for name, build in make(args).items()}
        # what decoding with a KV cache cannot serve: a feature's sequence or extra masks
        self.no_kv_cache = [f.NO_KV_CACHE for f in features_on(args) if hasattr(f, "NO_KV_CACHE")]
        # validation computes head + loss in chunks of this many tokens
        self.eval_chunk_tokens = max(st.seq_len for st in training_stages(args)) if args.stages else args.seq_len
        # the long window (blocks) when none is given: sampling and evaluation tools
        self.default_window_blocks = window_at(total_steps(args), args, final=True)[0] if args.stages else \
            next_multiple(args.window_schedule_tokens, BLOCK_SIZE) // BLOCK_SIZE
        # sockets that install (below) may fill: a mix of earlier residuals before the final norm and the per-token
        # gate values written before block 0 (--mudd_final_sources, --mudd_gate_block: features/mudd.py)
        self.mudd_final = PassThrough()
        self.pre_gate = PassThrough()
        for install in feature_hooks("install"):  # last: the core model's random draw is the one without them
            install(self, args)

    def attention_masks(self, inputs: Tensor, window_blocks) -> dict:
        """Build the long and the short mask once per sequence; every block reuses one of them. window_blocks: the
        long window (the short one is its half), or a (long, short) pair (--stages). Also the masks of a feature's
        own sequence that its blocks read (sequence_masks; --paired_head_layers: the doubled sequence, causal and
        windowed in its positions). The window counts in blocks or tokens as --window_unit says."""
        build = functools.partial(mask_builder(inputs), unit=self.window_unit)
        windows = {"L": (window_blocks[0], 0), "S": (window_blocks[1], 0)} if isinstance(window_blocks, tuple) else \
            {"L": (window_blocks, 0), "S": (window_blocks, 1)}
        masks = {kind: build(inputs, w, halvings=h) for kind, (w, h) in windows.items()}
        for name, seq in self.sequence_masks.items():
            docs = seq.document_ids(inputs)
            masks.update({f"{name}_{kind}": build(inputs, w, docs=docs, halvings=h) for kind, (w, h) in windows.items()
                          if f"{name}_{kind}" in self.mask_key})
        masks.update({name: build(inputs) for name, build in self.extra_masks.items()})
        return masks

    def forward(self, inputs: Tensor, targets: Tensor | None = None, window_blocks=None) -> Tensor:
        """inputs: 1-D token ids (one packed sequence). Returns the mean loss, or float32 logits without targets."""
        x = self.hidden(inputs, window_blocks)
        if targets is None:
            return self.logits(x)
        if self.training:
            return self.train_loss(self.logits(x), targets) + self.aux_loss()
        # Validation sequences are long; chunking the head keeps the fp32 logits small. Same mean, up to fp order.
        total = sum(F.cross_entropy(self.logits(xc), tc, reduction="sum")
                    for xc, tc in zip(x.split(self.eval_chunk_tokens), targets.split(self.eval_chunk_tokens)))
        return total / len(targets)

    def hidden(self, inputs: Tensor, window_blocks=None, cache: KVCache | None = None) -> Tensor:
        """The final normed hidden states (T, model_dim) that the head reads. With a KVCache, inputs continue the
        cached sequence (any length) and are appended to it."""
        window_blocks = self.default_window_blocks if window_blocks is None else window_blocks
        if cache is not None:
            if self.looks_back:
                raise NotImplementedError(f"decoding with a KV cache does not support {', '.join(self.looks_back)} "
                                          f"(they read the previous token, which the cache does not keep); run full "
                                          f"forward passes instead")
            if self.no_kv_cache:
                raise NotImplementedError(f"decoding with a KV cache does not support {' or '.join(self.no_kv_cache)} "
                                          f"(they attend over the doubled sequence or a second window, which the "
                                          f"cache does not build); run full forward passes instead")
            masks = cache.begin(inputs, window_blocks, self.window_unit)
        else:
            assert inputs.ndim == 1 and len(inputs) % BLOCK_SIZE == 0, "one packed sequence, a multiple of 128"
            masks = self.attention_masks(inputs, window_blocks)
        ves = [ve(inputs)[None] for ve in self.value_embeds]
        x0 = norm(self.mot(self.embed_noise(self.smear(self.embed(inputs)[None])), inputs))
        # what skips, backout, MUDD, gates and DC read besides x: block index -> its output, "in" -> the residual
        # entering block 0 (c0), "bigram" -> the bigram embedding b (written by BigramHashEmbedding), "gate.*" ->
        # the MUDD gates' per-token values (MuddGate), "masks" -> this forward's masks (DC reads its own there)
        outputs = {"masks": masks}
        self.pre_gate(x0, outputs)
        x = outputs["in"] = self.bigram(x0, inputs, outputs)
        for i, block in enumerate(self.blocks):
            for w, src in self.skips_into[i]:
                x = x + self.skip_gate(self.skip_weights[w]) * self.skip_scales[w](outputs[src], outputs)
            table = self.ve_table[i]
            x = block(x, x0, None if table is None else ves[table], masks[self.mask_key[i]], outputs)
            if i in self.kept_outputs:
                outputs[i] = x
        x = self.mudd_final(self.backout(x, outputs), outputs, ves)
        if cache is not None:
            cache.end()
        return norm(x)[0]

    def logits(self, x: Tensor) -> Tensor:
        return self.softcap(self.lm_head(x).float())

    def aux_loss(self):
        """The auxiliary losses the blocks' MLPs left in the last forward (--moe_experts: load balancing), summed
        and cleared (0 without them)."""
        total = 0
        for mlp in (block.mlp for block in self.blocks):
            if getattr(mlp, "aux_loss", None) is not None:
                total, mlp.aux_loss = total + mlp.aux_loss, None
        return total


def args_at_step(args: Hyperparameters, step: int) -> Hyperparameters:
    """The configuration of the model a checkpoint written at `step` holds (each feature's args_at_step: with
    --kron_progressive_every only the blocks swapped before that step are factorized)."""
    for at_step in feature_hooks("args_at_step"):
        args = at_step(args, step)
    return args


def build_model(args: Hyperparameters) -> GPT:
    """The model in fp32 on the CPU; main() moves it to the device (embeddings to bf16 on GPU). --weight_init then
    redraws the recipe's matrices (uniform: nothing to redraw), so every other parameter is the same draw."""
    return feature_table("WEIGHT_INITS", WEIGHT_INITS)[args.weight_init](GPT(args))


PARAM_DTYPES = ("r21", "record")  # --param_dtype


def record_bf16_params(model: GPT) -> list[nn.Parameter]:
    """--param_dtype=record: what the 2026 record stores in bf16 (its code casts every nn.Embedding and nn.Linear
    weight, the value-embedding gate bank and the MUDD / MUDD-gate W1, W2, b to bf16; its head is bf16 from the
    start) and Adam updates in place, rounded once per step: the head, the embeddings (token, value, bigram), the
    value-embedding gates, the smear gate, MUDD's and the MUDD gates' W1, W2, b. It keeps in fp32 the scalars, the
    residual / output lambdas and the gate scale; its Muon banks are bf16 plus a 16-bit mantissa, fp32 in effect,
    like our fp32 Muon matrices (their bf16 view is the fp32 value truncated, ours rounded to nearest)."""
    groups = param_groups(model)
    names = ("head", "embeds") + feature_table("RECORD_BF16_GROUPS", ())
    kept = {id(p) for kept_fp32 in feature_hooks("record_fp32_params") for p in kept_fp32(model)}  # MUDD gates' s
    return [p for name in names for p in groups.get(name, []) if id(p) not in kept]


def place_model(model: GPT, args: Hyperparameters, device: torch.device) -> GPT:
    """What main() does to a built model before training, and the tools that must see the same model: on the device;
    on a GPU bf16 embeddings (every activation is then bf16; CastedLinear casts its weights to match), and with
    --param_dtype=record the record's other bf16 parameters (record_bf16_params); the FP8 head (--fp8_head) and FP8
    MLPs (--fp8_mlp) where the GPU has FP8 matmuls (compute capability >= 8.9)."""
    on_gpu = device.type == "cuda"
    return set_gpu_dtypes(model.to(device), args, on_gpu, on_gpu and torch.cuda.get_device_capability(device) >= (8, 9))


def set_gpu_dtypes(model: GPT, args: Hyperparameters, on_gpu: bool, fp8_matmuls: bool) -> GPT:
    """place_model's dtypes on a model of any device (tools/memory_plan.py plans a GPU's on the meta device)."""
    if on_gpu:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()
        for p in record_bf16_params(model) if args.param_dtype == "record" else []:
            p.data = p.data.bfloat16()
    model.lm_head.use_fp8 = args.fp8_head and fp8_matmuls
    for place in feature_hooks("place"):  # --fp8_mlp: its MLPs in FP8 where the GPU has FP8 matmuls
        place(model, args, on_gpu, fp8_matmuls)
    return model


def param_groups(model: GPT, args: Hyperparameters | None = None) -> dict:
    """Which optimizer owns which parameter: the recipe's split, and each feature's param_groups (Kronecker factors:
    --kron_optimizer). 3-D expert and merged weights go to Muon as batches of matrices; learned_gelu's per-channel
    affine is a scalar group. The record's own Adam groups for small parameters (frontier recipe 2.2: the
    value-embedding gates, the smear gate, the sub-layer lambdas) are their features'."""
    routed = routed_params(model, args)  # the features' parameters, by group
    own_ids = {id(p) for params in routed.values() for p in params}
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2 and id(p) not in own_ids]
    scalars = [p for p in model.parameters() if p.ndim < 2 and id(p) not in own_ids]
    # a feature's embeddings: "embeds" train with the token embedding, "value_embeds" with the value embeddings
    embeds = [model.embed.weight] + [e.weight for e in model.value_embeds] + routed.pop("embeds", []) + \
        routed.pop("value_embeds", [])
    head = [p for p in model.lm_head.parameters() if p is not model.embed.weight]  # [] when tied: embeds own it
    head += routed.pop("head", [])
    groups = dict(matrices=matrices, scalars=scalars, embeds=embeds, head=head)
    for name, params in routed.items():  # groups of a feature's own, or core groups it adds to
        groups[name] = groups.get(name, []) + params
    assert sum(map(len, groups.values())) == len(list(model.parameters()))
    return groups


def routed_params(model: GPT, args: Hyperparameters | None) -> dict:
    """{group: [parameters]} of every feature's param_groups(model, args), merged in FEATURE_NAMES order."""
    routed = {}
    for route in feature_hooks("param_groups"):
        for name, params in route(model, args).items():
            routed.setdefault(name, []).extend(params)
    return routed


SMALL_ADAM_GROUPS = ()  # LR: --adam_group_lr or scalar_lr (the features' groups: ve_gate, smear_gate, ...)
ADAM_GROUPS = ("head", "embed", "value_embeds", "scalars") + SMALL_ADAM_GROUPS


def parse_group_values(text: str, flag: str, parse) -> dict:
    """--adam_group_betas, --adam_group_lr, --adam_group_wd: 'group=value,...' -> {group: parse(value)}."""
    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        known = feature_table("ADAM_GROUPS", ADAM_GROUPS) + feature_table("SMALL_ADAM_GROUPS", ())
        if name not in known:
            raise SystemExit(f"error: --{flag}: unknown Adam group {name!r}; groups: {', '.join(known)}")
        try:
            values[name] = parse(value)
        except ValueError:
            raise SystemExit(f"error: --{flag}={text!r}: bad value {value!r} for {name}") from None
    return values


def parse_betas(text: str) -> tuple[float, float]:
    b1, b2 = (float(v) for v in text.split("/"))
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError("betas in [0, 1)")
    return b1, b2


def adam_param_groups(model: GPT, args: Hyperparameters) -> list[dict]:
    """The Adam groups with their LR and betas (--adam_group_lr/--adam_group_betas name them)."""
    groups = param_groups(model, args)
    # the embeddings a feature trains like the value embeddings (--bigram_rows' table: frontier recipe 2.2)
    value_embeds = {id(p) for p in [*(e.weight for e in model.value_embeds),
                                    *routed_params(model, args).get("value_embeds", [])]}
    params = dict(head=groups["head"], embed=[p for p in groups["embeds"] if id(p) not in value_embeds],
                  value_embeds=[p for p in groups["embeds"] if id(p) in value_embeds], scalars=groups["scalars"])
    # the groups' order is the optimizer state's: the core's, the features' own (--kron_mlp: "kron", MUDD's), then
    # the small groups at --adam_group_lr (--ve_gate, --smear, --sublayer_lambdas), as checkpoints hold them
    lrs = dict(head=args.head_lr, embed=args.embed_lr, value_embeds=args.value_embed_lr or args.embed_lr,
               scalars=args.scalar_lr)
    for feature_lrs in feature_hooks("adam_lrs"):
        lrs |= feature_lrs(args)
    small_lrs = parse_group_values(args.adam_group_lr, "adam_group_lr", float)
    lrs |= {name: small_lrs.get(name, args.scalar_lr)
            for name in feature_table("SMALL_ADAM_GROUPS", SMALL_ADAM_GROUPS)}
    params |= {name: groups.get(name, []) for name in lrs if name not in params}
    betas = parse_group_values(args.adam_group_betas, "adam_group_betas", parse_betas)
    return [dict(name=name, params=params[name], lr=lrs[name],
                 betas=betas.get(name, (args.adam_beta1, args.adam_beta2)))
            for name in lrs if params[name]]


def muon_splits(model: GPT, args: Hyperparameters) -> dict:
    """{parameter: muon_pieces split} of every feature's muon_splits (--muon_qk_pairs: Q and K per head pair)."""
    return {p: split for make in feature_hooks("muon_splits") for p, split in make(model, args).items()}


def build_optimizers(model: GPT, args: Hyperparameters, rank: int = 0, world_size: int = 1,
                     grad_sync: "GradientSync | None" = None) -> list:
    """[Adam, Muon] for the model as it is. grad_sync: keep an existing GradientSync (its hooks are already on the
    parameters) instead of making one (progressive replacement rebuilds the optimizers mid-run)."""
    groups = param_groups(model, args)
    adam_groups = adam_param_groups(model, args)
    adam = built_by_feature("adam", adam_groups, args)  # --adam_wd: features/cautious_adam.py
    if adam is None:
        adam = torch.optim.Adam(adam_groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                fused=groups["embeds"][0].is_cuda)
    # --muon_proj_lr_mult: the dense MLP output projections (the frontier recipe's c_proj LR is 4x the base)
    projections = [m.c_proj.weight for m in model.blocks.modules()
                   if isinstance(m, (MLP, SwiGLUMLP)) and type(m.c_proj) is CastedLinear]
    muon = Muon(groups["matrices"], lr=args.muon_lr, momentum=args.muon_momentum_start, ns_steps=args.ns_steps,
                rank=rank, world_size=world_size, weight_decay=args.muon_wd,
                lr_mults={p: args.muon_proj_lr_mult for p in projections if args.muon_proj_lr_mult != 1.0},
                splits=muon_splits(model, args))
    muon.orthogonalize = feature_table("ORTHOGONALIZERS", ORTHOGONALIZERS)[args.muon_ns]
    muon.normalize = built_by_feature("muon_normalizer", args)  # --normuon_beta2: features/normuon.py
    if world_size > 1:
        muon.grad_sync = grad_sync or GradientSync(list(model.parameters()))
    for add_hooks in feature_hooks("optimizer_hooks"):  # --moe_experts: routing biases, --fp8_mlp: W2's scales
        add_hooks(model, adam, muon, args, world_size)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, muon]


@dataclass(frozen=True)
class Stage:
    """Steps start..end-1 of a staged run (--stages): sequence length, document cap, windows in blocks, LR level."""
    start: int
    end: int
    seq_len: int
    doc_cap: int
    short: int
    long: int
    lr_mult: float


def parse_windows(text: str, flag: str) -> tuple[int, int]:
    """'short-long' window sizes in 128-token blocks."""
    try:
        short, long = (int(v) for v in text.split("-"))
        assert 1 <= short <= long
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --{flag}: {text!r} is not short-long window blocks with 1 <= short <= long "
                         f"(e.g. 3-7)") from None
    return short, long


@functools.lru_cache(maxsize=8)
def _stages(spec: str, num_iterations: int, extension_steps: int, extension_window: str,
            final_lr_frac: float) -> tuple[Stage, ...]:
    items = spec.split(",")
    stages = []
    for i, item in enumerate(items):
        try:
            seq_len, doc_cap, windows, lr_mult = item.split(":")
            stages.append(Stage(round(num_iterations * i / len(items)), round(num_iterations * (i + 1) / len(items)),
                                int(seq_len), int(doc_cap), *parse_windows(windows, "stages"), float(lr_mult)))
            if not 0 <= stages[-1].lr_mult < math.inf:  # also refuses nan
                raise ValueError(lr_mult)
        except ValueError:
            raise SystemExit(f"error: --stages: {item!r} is not seq_len:doc_cap:short-long:lr_mult "
                             f"(e.g. 16384:896:1-3:1.0)") from None
    if extension_steps:
        last = stages[-1]
        windows = parse_windows(extension_window, "extension_window") if extension_window else (last.short, last.long)
        stages.append(Stage(num_iterations, num_iterations + extension_steps, last.seq_len, last.doc_cap, *windows,
                            final_lr_frac))
    return tuple(stages)


def training_stages(args: Hyperparameters) -> tuple[Stage, ...]:
    """--stages parsed: n stages split num_iterations into equal parts (boundaries rounded), then the extension
    steps as one more stage at the last stage's length. Empty without --stages (#21's single schedule)."""
    if not args.stages:
        return ()
    return _stages(args.stages, args.num_iterations, args.extension_steps, args.extension_window, args.final_lr_frac)


def stage_at(step: int, stages: tuple[Stage, ...]) -> Stage:
    return next((st for st in stages if step < st.end), stages[-1])


def total_steps(args: Hyperparameters) -> int:
    """Optimizer steps of the run: the scheduled num_iterations plus the extension steps."""
    return args.num_iterations + args.extension_steps


def sequence_length(step: int, args: Hyperparameters) -> int:
    stages = training_stages(args)
    return stage_at(step, stages).seq_len if stages else args.seq_len


def tokens_after(steps: int, args: Hyperparameters) -> int:
    """Training tokens consumed by the first `steps` steps (over all ranks)."""
    stages = training_stages(args)
    if not stages:
        return steps * args.micro_batches * args.seq_len
    return sum(max(0, min(steps, st.end) - st.start) * args.micro_batches * st.seq_len for st in stages)


def max_sequence_length(args: Hyperparameters) -> int:
    """The longest sequence the model sees (rotary tables): training stages and validation."""
    return max([args.seq_len if not args.stages else 0, args.val_seq_len]
               + [st.seq_len for st in training_stages(args)])


def lr_multiplier(step: int, args: Hyperparameters) -> float:
    stages = training_stages(args)
    if stages:  # the stage's level until the cooldown, then linear to final_lr_frac at num_iterations (and after)
        start = int((1 - args.cooldown_frac) * args.num_iterations)
        level = stage_at(step, stages).lr_mult
        if step < start:
            return level
        t = min(1.0, (step - start) / max(args.num_iterations - start, 1))
        return level * (1 - t) + args.final_lr_frac * t
    x = step / args.num_iterations
    if x < 1 - args.cooldown_frac:
        return 1.0
    w = (1 - x) / args.cooldown_frac
    return w + (1 - w) * args.final_lr_frac


def muon_momentum(step: int, args: Hyperparameters) -> float:
    """Linear warm-up from start to end; with --muon_momentum_cooldown_steps, back to start over the last steps."""
    frac = min(step / args.muon_momentum_warmup_steps, 1) if args.muon_momentum_warmup_steps else 1.0
    cooldown, left = args.muon_momentum_cooldown_steps, total_steps(args) - step
    if cooldown and left < cooldown:
        frac = min(frac, left / cooldown)
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum_end


def long_window_blocks(step: int, args: Hyperparameters) -> int:
    """Long sliding window (in 128-token blocks) at a step: grows from 1 block to the schedule's end (#21), or the
    stage's long window (--stages)."""
    stages = training_stages(args)
    if stages:
        return stage_at(step, stages).long
    tokens = args.window_schedule_tokens * step / args.num_iterations
    return max(1, math.ceil(tokens / BLOCK_SIZE))


def window_at(step: int, args: Hyperparameters, final: bool = False):
    """What the model's forward takes as its window: #21's long window in blocks (the short one is its half), or
    with --stages a (long, short) pair. final: the window of the final validation (--val_window)."""
    stages = training_stages(args)
    if not stages:
        return long_window_blocks(step, args)
    if final and args.val_window:
        short, long = parse_windows(args.val_window, "val_window")
    else:
        stage = stage_at(step, stages)
        short, long = stage.short, stage.long
    return long, short


def stage_table(args: Hyperparameters) -> str:
    """One line per stage for describe_model and the run log."""
    stages = training_stages(args)
    if not stages:
        return ""
    lines = ["stages: steps | tokens/step | seq_len | doc cap | windows short/long (blocks) | LR level"]
    for i, st in enumerate(stages):
        name = "ext" if i == len(stages) - 1 and args.extension_steps else str(i + 1)
        lines.append(f"  {name:>3}: {st.start}-{st.end - 1} | {args.micro_batches * st.seq_len:,} | {st.seq_len} | "
                     f"{st.doc_cap} | {st.short}/{st.long} | {st.lr_mult:g}")
    final = window_at(total_steps(args), args, final=True)
    lines.append(f"  final validation windows {final[1]}/{final[0]} blocks; "
                 f"{tokens_after(total_steps(args), args):,} training tokens")
    return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_flops_per_token(module: nn.Module) -> int:
    """Forward FLOPs per token of every matrix in module, each used once per token; a layer with macs_per_token()
    counts its factored contraction instead of its parameters (kernels.KronLinear)."""
    factored = [m for m in module.modules() if hasattr(m, "macs_per_token")]
    factored_ids = {id(p) for m in factored for p in m.parameters()}
    return (sum(2 * m.macs_per_token() for m in factored)
            + sum(2 * p.numel() for p in module.parameters() if p.ndim >= 2 and id(p) not in factored_ids))


@dataclass
class ModelPart:
    """A feature's line in describe_model's sums (its model_parts socket): " + {name} {params}" among the parameters,
    " + {flops_name} {flops / 1e6}M" among the forward FLOPs per token (each left out at 0)."""
    name: str
    params: int
    flops_name: str
    flops: float
    flops_digits: int = 1  # decimals of the FLOPs in millions


def describe_model(model: GPT, args: Hyperparameters) -> str:
    """Parameters per component and an estimate of the forward FLOPs per token: matrices (MoE: router plus the
    active experts), attention scores with every key of the final long/short window visible (documents only
    shorten it), and the head. Training costs about 3x the forward. Elementwise work is not counted (norms, rotary,
    XSA, smear, the bigram gather: a few thousand FLOPs/token each); the gates' 12-input dots are matrices, counted."""
    attns = [b.attn for b in model.blocks if b.attn is not None]
    mlps = [b.mlp for b in model.blocks]
    final = window_at(total_steps(args), args, final=True)
    long_blocks, short_blocks = final if isinstance(final, tuple) else (final, max(final // 2, 1))
    # keys a query sees in a window of n: the last n blocks, its own one about half (--window_unit=block), or the
    # 128 n + 1 keys 0..128 n back (token)
    keys = dict(block=lambda n: n * BLOCK_SIZE - BLOCK_SIZE // 2, token=lambda n: n * BLOCK_SIZE + 1)[args.window_unit]
    context = {k: min(model.eval_chunk_tokens, keys(n)) for k, n in (("L", long_blocks), ("S", short_blocks))}
    # a feature's own sequence (--paired_head_layers: doubled): a query sees as many keys (its positions) in the same
    # window of blocks; only a window longer than the sequence is capped at the sequence's length
    context |= {f"{name}_{k}": min(seq.positions_per_token * model.eval_chunk_tokens, keys(n))
                for name, seq in model.sequence_masks.items() for k, n in (("L", long_blocks), ("S", short_blocks))}
    score_flops = sum(2 * context[model.mask_key[i]] * b.attn.num_heads * (b.attn.qk_dim + b.attn.v_dim)
                      for i, b in enumerate(model.blocks) if b.attn is not None)
    # attention work a feature adds (--dc_layers: heads more attention calls per DC block over its window)
    extra_scores = [part for count in feature_hooks("score_flops") for part in count(model, args)]
    score_flops += sum(flops for _, flops in extra_scores)
    attn_flops = sum(dense_flops_per_token(a) for a in attns) + score_flops
    mlp_flops = sum(m.flops_per_token() if hasattr(m, "flops_per_token") else dense_flops_per_token(m) for m in mlps)
    head = [p for p in model.lm_head.parameters() if p is not model.embed.weight]  # [] when tied
    head_flops = 2 * model.lm_head.weight.numel()
    parts = [part for describe in feature_hooks("model_parts") for part in describe(model, args)]
    embeds = model.embed.weight.numel() + sum(e.weight.numel() for e in model.value_embeds)
    attn_params, mlp_params = sum(map(count_params, attns)), sum(map(count_params, mlps))
    other = (count_params(model) - embeds - sum(p.numel() for p in head) - attn_params - mlp_params
             - sum(part.params for part in parts))
    kind = lambda ms: ", ".join(sorted({type(m).__name__ + (f"({args.mlp_act})" if isinstance(m, MLP) else "")
                                        for m in ms}))
    head_kind = "tied to the embedding" if not head else next(  # --untie_step: features/untie.py
        (named for describe in feature_hooks("head_kind") if (named := describe(args))), "untied")
    mlp_note = mlps[0].summary() if hasattr(mlps[0], "summary") else ""  # --moe_experts: experts and routing
    notes = "".join(f", {note}" for describe in feature_hooks("architecture_notes") for note in describe(args))
    return (f"architecture: attention {kind(attns)} x{len(attns)} (KV cache "
            f"{sum(a.kv_cache_floats_per_token() for a in attns):,} floats/token over all layers), mlp {kind(mlps)}"
            f" x{len(mlps)}{mlp_note}, head {head_kind}{notes}\n"
            f"params: embeddings {embeds:,} + head {sum(p.numel() for p in head):,} + attention {attn_params:,} + "
            f"mlp {mlp_params:,} + block/skip scalars {other:,}"
            f"{''.join(f' + {part.name} {part.params:,}' for part in parts if part.params)} = {count_params(model):,}\n"
            f"forward FLOPs/token: attention {attn_flops / 1e6:.1f}M (of which scores {score_flops / 1e6:.1f}M "
            f"at windows {context['L']}/{context['S']}"
            f"{''.join(f', {name} {flops / 1e6:.1f}M' for name, flops in extra_scores if flops)}) + mlp "
            f"{mlp_flops / 1e6:.1f}M (active) + head "
            f"{head_flops / 1e6:.1f}M"
            f"{''.join(f' + {p.flops_name} {p.flops / 1e6:.{p.flops_digits}f}M' for p in parts if p.flops)} = "
            f"{(attn_flops + mlp_flops + head_flops + sum(part.flops for part in parts)) / 1e6:.1f}M"
            + (f"\n{stage_table(args)}" if args.stages else ""))


# -----------------------------------------------------------------------------------------------------------------
# Data loader

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4


class ShardError(ValueError):
    pass


def read_shard_header(path: Path) -> int:
    """Validate a shard's header against its size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated file)")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: wrong magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file has "
                         f"{size} bytes; truncated or corrupted, download or tokenize it again")
    return count


def load_data_shard(path) -> Tensor:
    count = read_shard_header(path)
    tokens = torch.empty(count, dtype=torch.uint16, pin_memory=torch.cuda.is_available())
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_BYTES)
        nbytes = f.readinto(tokens.numpy())
    if nbytes != 2 * count:
        raise ShardError(f"{path}: read {nbytes} bytes of tokens, expected {2 * count}")
    return tokens


def find_shards(pattern: str, kind: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise SystemExit(
            f"error: no {kind} shards match {pattern!r}.\n"
            f"  FineWeb:    python data/cached_fineweb10B.py 9   (val shard + 9 x 100M train tokens into data/fineweb10B/)\n"
            f"  Local text: python data/tokenize_text.py my_corpus.txt --out_dir data/local --name mine\n"
            f"              then --train_files='data/local/mine_train_*.bin' --val_files='data/local/mine_val_*.bin'")
    return files


def token_batches(files: list[Path], batch_tokens: int, offset: int, length: int, device: torch.device,
                  skip: int = 0):
    """Yield (inputs int32, targets int64) of `length` tokens starting at `offset` within each consecutive global
    batch of `batch_tokens` tokens. The stream is read in order; a shard's tail shorter than a batch is skipped.
    The first `skip` batches are skipped (resume) without reading the shards they lie in."""
    for path in files:
        in_shard = (read_shard_header(path) - 1) // batch_tokens
        if skip >= in_shard:
            skip -= in_shard
            continue
        tokens, pos, skip = load_data_shard(path), skip * batch_tokens, 0
        while pos + batch_tokens + 1 <= len(tokens):
            buf = tokens[pos + offset:pos + offset + length + 1]
            yield (buf[:-1].to(device=device, dtype=torch.int32, non_blocking=True),
                   buf[1:].to(device=device, dtype=torch.int64, non_blocking=True))
            pos += batch_tokens


def steps_available(files: list[Path], batch_tokens: int) -> int:
    return sum((read_shard_header(f) - 1) // batch_tokens for f in files)


def require_train_steps(files: list[Path], args: Hyperparameters) -> list[Path]:
    """The shards hold num_iterations steps of the core's contiguous batches."""
    global_tokens = args.micro_batches * args.seq_len
    available = steps_available(files, global_tokens)
    if available < args.num_iterations:
        raise SystemExit(
            f"error: {args.train_files!r} holds {available} steps of {global_tokens} tokens but num_iterations="
            f"{args.num_iterations}; download more shards (python data/cached_fineweb10B.py N, 100M tokens each) "
            f"or lower --num_iterations")
    return files


def require_val_tokens(files: list[Path], args: Hyperparameters, world_size: int) -> list[Path]:
    global_tokens = world_size * args.val_seq_len
    if steps_available(files, global_tokens) < args.val_tokens // global_tokens:
        raise SystemExit(f"error: {args.val_files!r} holds fewer than val_tokens={args.val_tokens} usable tokens; "
                         f"lower --val_tokens (a multiple of world_size x val_seq_len = {global_tokens})")
    return files


def train_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device, start_step: int = 0):
    """Each step: the next micro_batches x seq_len tokens; rank r reads its contiguous share, then splits it into
    micro_batches / world_size sequences (one per accumulation micro-step). Starts at batch `start_step`. A feature's
    loader in their place (--bos_align: features/bos_align.py)."""
    loader = feature_with("train_batches", args)
    if loader is not None:
        return loader.train_batches(args, rank, world_size, device, start_step)
    return contiguous_train_batches(args, rank, world_size, device, start_step)


def contiguous_train_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device,
                             start_step: int = 0):
    files = require_train_steps(find_shards(args.train_files, "train"), args)
    global_tokens, accum = args.micro_batches * args.seq_len, args.micro_batches // world_size
    local = token_batches(files, global_tokens, rank * accum * args.seq_len, accum * args.seq_len, device,
                          skip=start_step)
    for inputs, targets in local:
        yield list(zip(inputs.split(args.seq_len), targets.split(args.seq_len)))


def val_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device):
    files = require_val_tokens(find_shards(args.val_files, "val"), args, world_size)
    global_tokens = world_size * args.val_seq_len
    steps = args.val_tokens // global_tokens
    batches = token_batches(files, global_tokens, rank * args.val_seq_len, args.val_seq_len, device)
    return [next(batches) for _ in range(steps)]


# -----------------------------------------------------------------------------------------------------------------
# Logging and records


def environment_report(device: torch.device) -> str:
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
             f"platform {platform.platform()}"]
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi unavailable: {e}")
    else:
        lines.append(f"cpu: {cpu_name()}  cores: {os.cpu_count()}")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def records_root(args: Hyperparameters) -> Path:
    """Records belong beside the script, wherever the run was started from."""
    return HERE / args.records_dir  # an absolute --records_dir replaces HERE


def check_records_dir(args: Hyperparameters):
    """The record tree must be a directory this process can create and write, before a model is built."""
    root = records_root(args)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: --records_dir={args.records_dir}: {existing} is a file, not a directory; pass a "
                         f"directory (default: records beside train_gpt.py)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --records_dir={args.records_dir}: {existing} is not writable by this user; pass a "
                         f"writable directory")


def run_code_files(args: Hyperparameters) -> list[str]:
    """The files a record and a checkpoint keep: the script, the kernels, and every feature file the run uses."""
    return ["train_gpt.py", "kernels.py"] + [feature_file(f) for f in features_on(args)]


def record_folder(args: Hyperparameters, device: torch.device) -> Path:
    """records/<track>; CPU runs (smoke tests, ports, debugging) go to the git-ignored records/local/<track>, so
    they never land next to GPU records in the tracked tree."""
    root = records_root(args)
    if device.type == "cpu" and args.track != "local":
        return root / "local" / args.track
    return root / args.track


def write_failure(e: BaseException, path: Path) -> str:
    """Why a write failed, in words: torch.save reports a full disk or the file-size limit (ulimit -f, EFBIG) as an
    opaque 'unexpected pos' error, so look at the limit and the free space."""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"file too large: this process may write files of at most {limit / 2**20:.1f} MiB (ulimit -f)"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 2**30:
        return f"no space left: {free / 2**20:.0f} MiB free on the disk of {path.parent}"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class RecordWriteError(SystemExit):
    """The record file could not be written: the run stops with one line (a run without its record is lost)."""


class RunRecord:
    """records/<track>/<date>_<run_name>/<uuid>.txt: code, environment, flags, then one line per step, flushed as
    it goes. Opened with mode 'x' so an existing file is never overwritten. Only rank 0 writes and prints. A write
    that fails (disk full, ulimit -f) stops the run with one line; the console keeps getting the log."""

    def __init__(self, args: Hyperparameters, env: DistEnv):
        self.enabled = env.master
        self.path, self.broken = None, False
        if not self.enabled:
            return
        folder = record_folder(args, env.device) / f"{time.strftime('%Y-%m-%d')}_{args.run_name}"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{uuid.uuid4()}.txt"
        self.file = open(self.path, "x")
        try:
            for name in run_code_files(args):
                source = HERE / name
                self.section(name, source.read_text() if source.exists() else "(missing)")
            table = kernels.config_table_path()  # a tuned launch-config table, where one is in use
            if table is not None:
                self.section(f"kernel configs: {table}", table.read_text())
            self.section("environment", environment_report(env.device))
            self.section("hyperparameters", f"hparams: {json.dumps(dataclasses.asdict(args))}\n"
                                            f"flags: {json.dumps(changed_flags(args))}")
            self.section("log", "")
        except RecordWriteError:  # nothing trained yet: leave no half record behind
            self.path.unlink(missing_ok=True)
            raise

    def _write(self, text: str):
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:
            self.broken = True
            raise RecordWriteError(f"error: cannot write the record {self.path}: {write_failure(e, self.path)}; "
                                   f"free space or raise the limit and run again") from None

    def section(self, title: str, body: str):
        self._write(f"{'=' * 20} {title} {'=' * 20}\n{body}{'' if body.endswith(chr(10)) or not body else chr(10)}")

    def log(self, line: str, console: bool = True):
        if not self.enabled:
            return
        if console:
            print(line, flush=True)
        if not self.broken:
            self._write(line + "\n")


CHECKPOINT_FORMAT = "train_gpt-checkpoint-v1"


def save_checkpoint(path: Path, model: GPT, optimizers: list, args: Hyperparameters, step: int,
                    train_time_ms: float, weights_only: bool = False, pending_grads: list | None = None) -> Path:
    """Everything a run needs to continue exactly. Written to a temp file and renamed, so a crash never leaves a
    half-written checkpoint under the final name. Optimizer states are identical on every rank once Muon's momentum
    has been gathered from its owners (Muon.gather_momentum(), which the run calls first), so rank 0's file is the
    whole state."""
    state = dict(
        format=CHECKPOINT_FORMAT, model=model.state_dict(), optimizers=[opt.state_dict() for opt in optimizers],
        step=step, train_time_ms=train_time_ms, args=dataclasses.asdict(args),
        code={name: (HERE / name).read_text() for name in run_code_files(args)},
        data=dict(step=step, tokens=tokens_after(step, args), train_files=args.train_files),
        rng=torch.get_rng_state(), pending_grads=pending_grads)
    if weights_only:  # for --init_from, eval, sample and teachers: the optimizer states are most of the bytes
        for key in ("optimizers", "rng", "pending_grads"):
            del state[key]
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # whose it is: stale_temporaries
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full, a second Ctrl-C) leaves no temporary
        tmp.unlink(missing_ok=True)
    return path


def stale_temporaries(folder: Path) -> list[Path]:
    """Checkpoint temporaries in folder whose writer is gone: written on this host by a process that no longer
    runs (SIGKILL, a power cut), or, named without their writer (before it was in the name), over an hour old."""
    stale = []
    for tmp in folder.glob("*.pt*.tmp"):
        parts = tmp.name.split(".")  # <stem>_<name>.pt.<host>.<pid>.tmp or <stem>_<name>.pt.tmp
        if parts[-2] == "pt":
            if time.time() - tmp.stat().st_mtime > 3600:
                stale.append(tmp)
            continue
        host, pid = ".".join(parts[parts.index("pt") + 1:-2]), parts[-2]
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            stale.append(tmp)
    return stale


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def pending_gradients(adam: torch.optim.Optimizer, world_size: int) -> list | None:
    """Collective. Adam's gradients still waiting for their step (--adam_every > 1), one entry per Adam parameter
    (None where there is none), for a checkpoint: each rank's local sum, averaged over ranks, so that a resumed run,
    whose ranks each start from the average, sums to the same total. None when nothing is pending."""
    grads = [p.grad for group in adam.param_groups for p in group["params"]]
    if all(g is None for g in grads):
        return None
    pending = [None if g is None else g.detach().float().clone() for g in grads]
    for g in pending:
        if g is not None and world_size > 1:
            dist.all_reduce(g)
            g /= world_size
    return [None if g is None else g.cpu() for g in pending]


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """mmap=True only maps the file: a cheap readability check before a run builds anything."""
    if not Path(path).is_file():
        raise SystemExit(f"error: checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it may be "
                         f"truncated; use another one (runs write *_stepN.pt and *_final.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a train_gpt.py checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def checkpoint_args(ckpt: dict) -> Hyperparameters:
    """The checkpoint's flags; fields this version of the script does not know are dropped with a warning."""
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    dropped = sorted(set(ckpt["args"]) - known)
    if dropped:
        print(f"warning: checkpoint flags unknown to this train_gpt.py are ignored: {dropped}", file=sys.stderr)
    values = {k: v for k, v in ckpt["args"].items() if k in known}
    if isinstance(values.get("save_checkpoint"), bool):  # written before the flag took off/full/weights
        values["save_checkpoint"] = "full" if values["save_checkpoint"] else "off"
    return Hyperparameters(**values)


def checkpoint_model_args(ckpt: dict) -> Hyperparameters:
    """The flags of the model a checkpoint holds (its weights' layout): its flags at its step, so a checkpoint written
    before the last --kron_progressive_every swap builds the blocks it has (tools/eval.py, sample.py, mlp_init.py)."""
    args = checkpoint_args(ckpt)
    return args_at_step(args, ckpt.get("step", total_steps(args)))


def load_weights(model: nn.Module, state: dict, partial: bool = False) -> str:
    """Load matching tensors; a shape mismatch stops the run unless partial. Returns a report of what was not
    loaded (missing keys keep their fresh initialization)."""
    own = model.state_dict()
    mismatched = shape_mismatches(own, state)
    if mismatched and not partial:
        raise SystemExit("error: checkpoint tensors do not fit this model's shapes:\n  " + "\n  ".join(mismatched)
                         + "\nbuild the same architecture, or pass --init_partial=true to skip these tensors")
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    missing = [k for k in own if k not in loadable]
    unexpected = [k for k in state if k not in own]
    return (f"loaded {len(loadable)}/{len(own)} tensors; missing (fresh init): {missing or 'none'}; "
            f"unexpected (ignored): {unexpected or 'none'}; shape-mismatched (skipped): {mismatched or 'none'}")


def shape_mismatches(own: dict, state: dict) -> list[str]:
    """The tensors of a checkpoint's state whose shapes differ from the model's (own) of the same name."""
    return [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and v.shape != own[k].shape]


# -----------------------------------------------------------------------------------------------------------------
# Training loop


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WindowTensors:
    """The window of each step (window_at) as device tensors, made once per distinct value (a few dozen over a run)
    rather than copied from Python every step. Tensors, not ints, so a new size reuses the compiled graph."""

    def __init__(self, args: Hyperparameters, device: torch.device):
        self.args, self.device, self.cache = args, device, {}

    def _tensors(self, blocks):
        if blocks not in self.cache:
            make = lambda n: torch.tensor(n, dtype=torch.int32, device=self.device)
            self.cache[blocks] = tuple(map(make, blocks)) if isinstance(blocks, tuple) else make(blocks)
        return self.cache[blocks]

    def __getitem__(self, step: int):
        return self._tensors(window_at(step, self.args))

    def final(self):
        """The window of the final validation (--val_window with --stages; else the last step's)."""
        return self._tensors(window_at(total_steps(self.args), self.args, final=True))


def feature_schedules(model: nn.Module, args: Hyperparameters, device: torch.device) -> list:
    """Each feature's per-step values, set in place before every step by set(step) (its schedule socket:
    --mtp_weights' loss weights, --yarn's rotary buffers)."""
    return [s for make in feature_hooks("schedule") if (s := make(model, args, device)) is not None]


class LossWatch:
    """Non-blocking divergence check: each step's loss is copied into pinned host memory behind a CUDA event, and
    first_nonfinite() reads only the copies whose event has completed, so the training loop never waits for the
    GPU. A non-finite loss is found a step or two late; wait=True (end of run) reads all."""

    def __init__(self, device: torch.device):
        self.on_gpu, self.pending = device.type == "cuda", []

    def push(self, step: int, loss: Tensor):
        if not self.on_gpu:
            self.pending.append((step, loss, None))
            return
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((step, host, event))

    def first_nonfinite(self, wait: bool = False) -> int | None:
        """The step of the first non-finite loss among the copies that are ready (all with wait), or None."""
        while self.pending:
            step, value, event = self.pending[0]
            if event is not None and not (wait or event.query()):
                return None
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            if not math.isfinite(value.item()):
                return step
        return None


def train_step(model, optimizers, micro_batches, window, args, step, world_size) -> Tensor:
    """One optimizer step: accumulate this rank's micro-batches, sum gradients over ranks, step. Returns the summed
    (over micro-batches and ranks) loss divided by micro_batches = the global mean loss, as a tensor.

    With several ranks the gradient all-reduces start during the last backward (GradientSync) and each optimizer
    waits only for its own gradients; Muon steps first so its Newton-Schulz overlaps the rest of the reduction.
    The optimizers own disjoint parameters, so their order does not change the math. Micro-batches are sequences of
    one length (the step's stage)."""
    sync = next((opt.grad_sync for opt in optimizers if isinstance(opt, Muon)), None)
    if world_size > 1 and sync is None:
        raise ValueError(f"train_step at world_size {world_size} needs optimizers built for it: "
                         f"build_optimizers(model, args, rank, world_size) sums the gradients over ranks")
    # Muon steps every step, Adam every --adam_every steps on the gradients of those steps summed
    adam_due = (step + 1) % args.adam_every == 0
    stepping = sorted((opt for opt in optimizers if isinstance(opt, Muon) or adam_due),
                      key=lambda o: not isinstance(o, Muon))
    if sync is not None:
        sync.deferred = set() if adam_due else {p for opt in optimizers if not isinstance(opt, Muon)
                                                for group in opt.param_groups for p in group["params"]}
    step_loss = torch.zeros((), device=micro_batches[0][0].device)
    for i, (inputs, targets) in enumerate(micro_batches):
        if sync is not None:
            sync.armed = i == len(micro_batches) - 1
        loss = model(inputs, targets, window)
        # Every micro-batch of the global batch is weighted 1/micro_batches, so a sum over ranks is the mean.
        (loss / args.micro_batches).backward()
        step_loss += loss.detach() / args.micro_batches
    if sync is not None:
        sync.reduce_rest()
    loss_handle = dist.all_reduce(step_loss, async_op=True) if world_size > 1 else None
    lr_mult, momentum = lr_multiplier(step, args), muon_momentum(step, args)
    for opt in stepping:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = momentum
        if sync is not None and not isinstance(opt, Muon):
            sync.wait([p for group in opt.param_groups for p in group["params"]])
        opt.step()
    if sync is not None:
        sync.wait(list(sync.handles))
    if loss_handle is not None:
        loss_handle.wait()
    for opt in stepping:  # the others keep their gradients to sum them with the next steps'
        opt.zero_grad(set_to_none=True)
    return step_loss


@torch.no_grad()
def evaluate(model, batches, window, world_size) -> float:
    model.eval()
    total = torch.zeros((), device=batches[0][0].device)
    for inputs, targets in batches:
        total += model(inputs, targets, window)
    model.train()
    return all_reduce_sum_(total, world_size).item() / (len(batches) * world_size)


def warmup_schedule(args: Hyperparameters) -> list[int]:
    """The steps whose shapes and schedule values the compile warm-up imitates: the first warmup_steps, or with
    --stages an equal share at the start of every stage, so each stage's graph is compiled before the clock runs."""
    stages = training_stages(args)
    if not stages or not args.warmup_steps:
        return list(range(args.warmup_steps))
    share = math.ceil(args.warmup_steps / len(stages))
    return [st.start + j for st in stages for j in range(min(share, st.end - st.start))]


def compile_warmup(model, raw_model, optimizers, args, env, val_window):
    """Compile forward/backward/optimizer kernels on random tokens, then restore the initial state exactly."""
    model_state = copy.deepcopy(raw_model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    gen = torch.Generator().manual_seed(12345)
    accum = args.micro_batches // env.world_size
    windows = WindowTensors(args, env.device)
    schedules = feature_schedules(raw_model, args, env.device)
    for step in warmup_schedule(args):
        for schedule in schedules:
            schedule.set(step)
        tokens = torch.randint(0, args.vocab_size, (accum, sequence_length(step, args) + 1), generator=gen)
        tokens = tokens.to(env.device)
        micro = [(t[:-1].int(), t[1:].long()) for t in tokens]
        window = windows[step]
        train_step(model, optimizers, micro, window, args, step, env.world_size)
    if args.warmup_steps:
        val = torch.randint(0, args.vocab_size, (args.val_seq_len + 1,), generator=gen).to(env.device)
        evaluate(model, [(val[:-1].int(), val[1:].long())], val_window, env.world_size)
    raw_model.load_state_dict(model_state)
    for opt, state in zip(optimizers, opt_states):
        opt.load_state_dict(state)
    raw_model.zero_grad(set_to_none=True)  # gradients kept for a later Adam step (--adam_every) are warm-up's


def parse_args(argv: list[str]) -> tuple[Hyperparameters, dict | None]:
    """Flags, or with --resume the checkpoint's flags with the explicit flags applied on top."""
    args = apply_overrides(Hyperparameters(), list(argv))
    if not args.resume:
        return args, None
    ckpt = load_checkpoint(args.resume)
    if "optimizers" not in ckpt:
        raise SystemExit(f"error: {args.resume} holds weights only (--save_checkpoint=weights), so it cannot be "
                         f"resumed; start from its weights with --init_from={args.resume}")
    return apply_overrides(checkpoint_args(ckpt), list(argv)), ckpt


def check_gpus():
    """Before any process group: every local rank needs its own GPU when CUDA is there."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world > torch.cuda.device_count():
        raise SystemExit(f"error: {local_world} processes per node but {torch.cuda.device_count()} GPU(s) visible; "
                         f"use --nproc_per_node={torch.cuda.device_count()} (NPROC={torch.cuda.device_count()} "
                         f"./run.sh); micro_batches stays the same, gradient accumulation makes up the difference")


def check_inputs(args: Hyperparameters, world_size: int, own: dict):
    """Everything a run reads, checked before a model or a record exists: shards present with valid headers and
    enough tokens (documents with --bos_align), the record tree writable, checkpoint files readable (memory-mapped,
    not loaded) and, for --init_from, shaped like this model (own: its state_dict on the meta device)."""
    try:
        loader = feature_with("train_batches", args)  # its require_train_data checks the shards for its batches
        (require_train_steps if loader is None else loader.require_train_data)(find_shards(args.train_files, "train"),
                                                                               args)
        require_val_tokens(find_shards(args.val_files, "val"), args, world_size)
    except ShardError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename}: {e.strerror}") from None
    check_records_dir(args)
    for check in feature_hooks("check_inputs"):
        check(args)
    if args.init_from:
        problems = shape_mismatches(own, load_checkpoint(args.init_from, mmap=True)["model"])
        if problems and not args.init_partial:
            raise SystemExit(f"error: --init_from={args.init_from} does not fit this model: "
                             f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}; build the same "
                             f"architecture, or pass --init_partial=true to skip these tensors")


def meta_model(args: Hyperparameters, step: int) -> GPT:
    """The model main() builds at `step` (a resumed progressive run has swapped blocks), on the meta device: every
    shape, no memory, no random draw. Sizes past int64 overflow even there: one line."""
    try:
        with torch.device("meta"):
            return build_model(args_at_step(args, step))
    except RuntimeError as e:
        raise SystemExit(f"error: the model's tensor sizes overflow ({str(e).splitlines()[0][:120]}); lower "
                         f"--model_dim (now {args.model_dim}) or --mlp_ratio / --vocab_size") from None


def check_resume(args: Hyperparameters, ckpt: dict, own: dict):
    """A resume that cannot continue stops before any record: nothing left to train, or flags that build another
    model (own: its state_dict on the meta device) than the checkpoint's (a resume takes the checkpoint's flags; the
    explicit ones override them)."""
    step, steps, state = ckpt["step"], total_steps(args), ckpt["model"]
    if step >= steps:
        raise SystemExit(f"error: {args.resume} is at step {step} and the run has {steps} steps: nothing left to "
                         f"train; to train on, pass a larger --num_iterations (or --extension_steps)")
    problems = (shape_mismatches(own, state) + [f"{k} missing from the checkpoint" for k in own if k not in state]
                + [f"{k} not in this model" for k in state if k not in own])
    if problems:
        raise SystemExit(f"error: --resume={args.resume}: the flags build another model than the checkpoint's: "
                         f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}; drop the architecture "
                         f"flags (a resume takes the checkpoint's) or start from its weights with --init_from")


def device_memory_bytes() -> tuple[str, int]:
    """This process's device and its total memory: the GPU torchrun gives it, or the machine's RAM."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_name(local_rank), torch.cuda.get_device_properties(local_rank).total_memory
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pages = 0
    return "this machine's RAM", pages


def check_memory(args: Hyperparameters, model: GPT):
    """A model whose weights and gradients alone cannot fit the device stops here with its size, not in the
    allocator. Counted on the meta device (meta_model). A lower bound (2 bytes a value on a GPU, 4 on a CPU;
    optimizer states and activations come on top), so it never refuses a run that would fit."""
    params = count_params(model)
    device, available = device_memory_bytes()
    needed = params * (2 if torch.cuda.is_available() else 4) * 2
    if available and needed > available:
        raise SystemExit(f"error: the model has {params:,} parameters; its weights and gradients alone need "
                         f"{needed / 2**30:,.1f} GiB but {device} has {available / 2**30:,.1f} GiB; lower --model_dim "
                         f"(now {args.model_dim}) or --num_layers (now {args.num_layers})")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (torchrun, schedulers) asks the run to stop at the next step boundary, where the
    weights and optimizer states are consistent; the loop then raises KeyboardInterrupt and the run ends as
    'interrupted'. A second signal stops at once."""

    class AtBoundary(KeyboardInterrupt):
        """Raised by check(): the last step finished, so the state can be checkpointed."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.requested = True
        print(f"signal {signum}: stopping after this step (send it again to stop now)", file=sys.stderr, flush=True)

    def check(self):
        if self.requested:
            raise StopRequest.AtBoundary("stop requested")


def fail_once(error: SystemExit, rank: int):
    """A configuration error under torchrun: rank 0 says it, the other ranks leave quietly with the same code."""
    if rank == 0:
        raise error
    raise SystemExit(2)


class Checkpoints:
    """This run's checkpoints, <record stem>_<name>.pt beside its record. Untimed: every rank hands its Muon momentum
    to the others, then rank 0 writes while the others wait at the next collective. A write that fails (disk full,
    ulimit -f) is logged and the run goes on: the record keeps the result. Of the periodic checkpoints the newest
    --keep_checkpoints stay; the final and the interrupted ones always."""

    def __init__(self, record: RunRecord, model: GPT, optimizers: list, args: Hyperparameters, env: DistEnv):
        self.record, self.model, self.optimizers, self.args, self.env = record, model, optimizers, args, env
        self.last: Path | None = None  # the newest one on disk: the summary's resume point
        self.periodic: list[Path] = []
        self.failures = 0

    def save(self, step: int, name: str, train_time_ms: float, weights_only: bool = False,
             periodic: bool = False) -> Path | None:
        self.optimizers[1].gather_momentum()
        pending = pending_gradients(self.optimizers[0], self.env.world_size)
        if not self.env.master:
            return None
        path = self.record.path.with_name(f"{self.record.path.stem}_{name}.pt")
        try:
            save_checkpoint(path, self.model, self.optimizers, self.args, step, train_time_ms, weights_only, pending)
        except (OSError, RuntimeError) as e:
            self.failures += 1
            self.record.log(f"checkpoint failed: {write_failure(e, path)}; writing {path}; "
                            f"{'training continues' if periodic else 'the record keeps the result'}")
            return None
        self.last, removed = path, []
        if periodic:
            self.periodic.append(path)
            while self.args.keep_checkpoints and len(self.periodic) > self.args.keep_checkpoints:
                removed.append(self.periodic.pop(0))
                removed[-1].unlink(missing_ok=True)
        kept = sum(p.stat().st_size for p in self.periodic) / 2**20
        self.record.log(f"checkpoint: {path} ({path.stat().st_size / 2**20:.1f} MiB)" + (
            f"; periodic kept: {len(self.periodic)} ({kept:.0f} MiB, --keep_checkpoints={self.args.keep_checkpoints})"
            f"{'; removed ' + ', '.join(p.name for p in removed) if removed else ''}" if periodic else ""))
        return path


def checked_args(argv: list[str], rank: int) -> tuple[Hyperparameters, dict | None]:
    """The flags (with --resume: the checkpoint's, overridden) and everything wrong with them, the inputs or the
    device's memory, found before any process group, model or record exists."""
    try:
        args, resume = parse_args(argv)
        for warning in meaningless_flags(args) if rank == 0 else []:
            print(warning, file=sys.stderr)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_gpus()
        try:  # a tuned launch-config table (tools/bench_kernels.py --tune) must parse, whatever the flags
            kernels.config_table()
        except kernels.KernelConfigError as e:
            raise SystemExit(str(e)) from None
        check_config(args, world_size)
        model = meta_model(args, resume["step"] if resume is not None else 0)  # built once for the three checks
        check_memory(args, model)
        check_inputs(args, world_size, model.state_dict())
        if resume is not None:
            check_resume(args, resume, model.state_dict())
    except SystemExit as e:
        if e.code in (0, None):
            raise
        fail_once(e, rank)
    return args, resume


@dataclass
class TrainingRun:
    """What main() trains: the model, what the loss is computed on (the model or its Distiller), the optimizers,
    and where training starts (a resumed step and its train time so far)."""
    model: GPT
    trainee: nn.Module
    optimizers: list
    start_step: int = 0
    train_time_ms: float = 0.0
    init_report: str | None = None


def build_run(args: Hyperparameters, resume: dict | None, env: DistEnv) -> TrainingRun:
    """The model (same seed on every rank: identical weights; a resumed progressive run builds the swapped blocks),
    --init_from, the teacher, the optimizers, and a resume's states."""
    model = place_model(build_model(args_at_step(args, resume["step"] if resume is not None else 0)), args,
                        env.device)
    init_report = load_weights(model, load_checkpoint(args.init_from)["model"], args.init_partial) \
        if args.init_from else None
    optimizers = build_optimizers(model, args, env.rank, env.world_size)
    trainee = built_by_feature("trainee", model, optimizers, args, env)  # --teacher: features/distill.py's Distiller
    run = TrainingRun(model, model if trainee is None else trainee, optimizers, init_report=init_report)
    if resume is not None:
        model.load_state_dict(resume["model"])  # check_resume compared the shapes
        try:
            for opt, state in zip(optimizers, resume["optimizers"], strict=True):
                opt.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"error: --resume={args.resume}: its optimizer states do not fit this run's optimizer "
                             f"groups ({str(e).splitlines()[0]}); drop the flags that change them (a feature's flags, "
                             f"e.g. --kron_optimizer or --teacher)") from None
        torch.set_rng_state(resume["rng"])
        run.start_step, run.train_time_ms = resume["step"], resume["train_time_ms"]
        adam_params = [p for group in optimizers[0].param_groups for p in group["params"]]
        for p, grad in zip(adam_params, resume.get("pending_grads") or [None] * len(adam_params), strict=True):
            p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype)
    return run


def log_run_header(log, run: TrainingRun, args: Hyperparameters, env: DistEnv, compiled: bool):
    model = run.model
    groups = param_groups(model, args)
    fp8 = model.lm_head.use_fp8
    # the blocks' CastedLinears never run FP8 (only the head's may): a use_fp8 there is --fp8_mlp's (its feature)
    fp8_mlp_on = any(getattr(m, "use_fp8", False) for m in model.blocks.modules())
    log(f"model: {count_params(model):,} parameters (block matrices {sum(p.numel() for p in groups['matrices']):,}, "
        f"embeddings {sum(p.numel() for p in groups['embeds']):,}, head {sum(p.numel() for p in groups['head']):,}, "
        f"scalars {sum(p.numel() for p in groups['scalars']):,}); world_size {env.world_size}, "
        f"grad accumulation {args.micro_batches // env.world_size}, device {device_name(env.device)}, "
        f"fp8 head {fp8}, fp8 mlp {fp8_mlp_on}, compile {compiled}", console=True)
    log(describe_model(model, args))
    if run.init_report:
        log(f"init_from {args.init_from}: {run.init_report}")
    if args.resume:
        log(f"resumed from {args.resume} at step {run.start_step} (train_time {run.train_time_ms:.0f}ms so far)")
    for log_feature in feature_hooks("log_header"):
        log_feature(log, run, args, env)


def remove_stale_temporaries(record: RunRecord, args: Hyperparameters):
    """Checkpoint temporaries that killed runs left in this run's folder (and the resumed one's)."""
    if not record.enabled:
        return
    folders = {record.path.parent} | ({Path(args.resume).resolve().parent} if args.resume else set())
    for tmp in (t for folder in folders for t in stale_temporaries(folder)):
        size = tmp.stat().st_size / 2**20
        tmp.unlink(missing_ok=True)
        record.log(f"removed a stale checkpoint temporary of a stopped run: {tmp} ({size:.0f} MiB)")


@dataclass
class Outcome:
    status: str  # ok | failed | interrupted
    reason: str | None
    val_loss: float
    step: int


def train(run: TrainingRun, train_model: nn.Module, args: Hyperparameters, env: DistEnv, record: RunRecord,
          checkpoints: Checkpoints, stop: StopRequest) -> Outcome:
    """The timed loop: validation and checkpoints untimed, a non-finite loss ends the run as failed, Ctrl-C or
    SIGTERM at a step boundary as interrupted (with a checkpoint when --save_every is on), any other error is
    recorded as failed and propagates."""
    model, optimizers, start_step, log = run.model, run.optimizers, run.start_step, record.log
    train_loader = train_batches(args, env.rank, env.world_size, env.device, start_step)
    val_data = val_batches(args, env.rank, env.world_size, env.device)
    final_window = WindowTensors(args, env.device).final()
    if train_model is not run.trainee and args.warmup_steps:
        t = time.perf_counter()
        compile_warmup(train_model, run.trainee, optimizers, args, env, final_window)
        log(f"compile warm-up: {args.warmup_steps} steps in {time.perf_counter() - t:.1f}s (untimed)")
    status, reason, val_loss, step = "ok", None, float("nan"), start_step
    windows = WindowTensors(args, env.device)
    schedules = feature_schedules(model, args, env.device)
    step_hooks = [hook for make in feature_hooks("per_step") if (hook := make(model, args, env)) is not None]
    loss_watch = LossWatch(env.device)
    steps = total_steps(args)
    try:
        synchronize(env.device)
        t0 = time.perf_counter()
        for step in range(start_step, steps + 1):
            stop.check()
            last = step == steps
            window = windows[step]
            for schedule in schedules:  # YaRN's rotary buffers, a feature's per-step values (loss weights)
                schedule.set(step)
            periodic_save = args.save_every and step % args.save_every == 0 and step > start_step and not last
            if last or (args.val_every > 0 and step % args.val_every == 0):
                synchronize(env.device)
                run.train_time_ms += 1000 * (time.perf_counter() - t0)
                val_loss = evaluate(train_model, val_data, final_window if last else window, env.world_size)
                log(f"step:{step}/{steps} val_loss:{val_loss:.4f} train_time:{run.train_time_ms:.0f}ms "
                    f"step_avg:{run.train_time_ms / max(step, 1):.2f}ms tokens:{tokens_after(step, args)}"
                    f"{''.join(note(model) for note in feature_hooks('val_log'))}")
                if not math.isfinite(val_loss):
                    status, reason = "failed", f"non-finite val loss at step {step}"
                    break
                if periodic_save:
                    checkpoints.save(step, f"step{step}", run.train_time_ms, periodic=True)
                synchronize(env.device)
                t0 = time.perf_counter()
            elif periodic_save:
                synchronize(env.device)
                run.train_time_ms += 1000 * (time.perf_counter() - t0)
                checkpoints.save(step, f"step{step}", run.train_time_ms, periodic=True)
                t0 = time.perf_counter()
            if last:
                break
            batch = next(train_loader)
            for hook in step_hooks:  # --kron_progressive_every: a block's MLP may become Kronecker here
                hook.at(step, optimizers, batch, window)
            loss = train_step(train_model, optimizers, batch, window, args, step, env.world_size)
            loss_watch.push(step + 1, loss)
            bad_step = loss_watch.first_nonfinite()
            if bad_step is not None:
                status, reason = "failed", f"non-finite train loss at step {bad_step}"
                break
            approx_ms = run.train_time_ms + 1000 * (time.perf_counter() - t0)
            log(f"step:{step + 1}/{steps} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / (step + 1):.2f}ms")
        bad_step = loss_watch.first_nonfinite(wait=True)
        if status == "ok" and bad_step is not None:
            status, reason = "failed", f"non-finite train loss at step {bad_step}"
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (StopRequest)
        # At a step boundary one process can write a resumable checkpoint; several ranks may have stopped at
        # different steps or inside a collective, so they keep only the last periodic checkpoint.
        if isinstance(e, StopRequest.AtBoundary) and args.save_every and env.world_size == 1 and step > start_step:
            run.train_time_ms += 1000 * (time.perf_counter() - t0)
            try:
                checkpoints.save(step, f"step{step}_interrupted", run.train_time_ms)
            except KeyboardInterrupt:  # a second signal while writing: stop now, keep the last periodic one
                log("second signal while writing the interrupted checkpoint: not written")
        resume_hint = f"; resume: --resume={checkpoints.last}" if checkpoints.last else ""
        log(f"status: interrupted at step {step}{resume_hint}")
        return Outcome("interrupted", None, val_loss, step)
    except BaseException as e:  # the record says how the run ended, then the error propagates
        # No final_val_loss key: tools/records.py reads that as a crash (rerun it), not a divergence.
        log(f"status: failed reason: {type(e).__name__}: {e}")
        log(f"summary: {json.dumps(dict(status='failed', reason=repr(e), record=str(record.path)))}")
        raise
    for log_feature in feature_hooks("log_after_training"):
        log_feature(log, run, args, env, val_data)
    return Outcome(status, reason, val_loss, step)


def log_peak_memory(log, device: torch.device):
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    else:
        import resource
        log(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


def run_summary(outcome: Outcome, run: TrainingRun, args: Hyperparameters, env: DistEnv, record: RunRecord,
                checkpoints: Checkpoints) -> dict:
    """The record's last line: what tools/records.py reads."""
    step, val_loss = outcome.step, outcome.val_loss
    if outcome.status == "interrupted":
        return dict(status="interrupted", steps=step, record=str(record.path),
                    checkpoint=str(checkpoints.last) if checkpoints.last else None, resumed_from=args.resume or None)
    summary = dict(
        status=outcome.status, final_val_loss=val_loss if math.isfinite(val_loss) else None,
        train_time_ms=run.train_time_ms, step_avg_ms=run.train_time_ms / max(step, 1), steps=step,
        tokens=tokens_after(step, args),
        tokens_per_step=args.micro_batches * sequence_length(max(step - 1, 0), args),  # the last stage's
        world_size=env.world_size, device=device_name(env.device), track=args.track, run_name=args.run_name,
        date=time.strftime("%Y-%m-%d"), seed=args.seed, params=count_params(run.model),
        non_embedding_params=count_params(run.model.blocks), flags=changed_flags(args), git_commit=git_commit(),
        record=str(record.path) if record.path else None,
        checkpoint=str(checkpoints.last) if checkpoints.last else None, resumed_from=args.resume or None)
    if outcome.reason:
        summary["reason"] = outcome.reason
    if checkpoints.failures:
        summary["checkpoint_failures"] = checkpoints.failures
    return summary


def main(argv: list[str] | None = None) -> int:
    args, resume = checked_args(sys.argv[1:] if argv is None else argv, int(os.environ.get("RANK", "0")))
    env = setup_distributed()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    try:  # everything that reads the checkpoints, then the record: a run that cannot start leaves none
        run = build_run(args, resume, env)
        record = RunRecord(args, env)
    except SystemExit as e:
        fail_once(e, env.rank)
    compiled = args.compile and env.device.type == "cuda"
    if compiled:
        run.optimizers[1].orthogonalize = torch.compile(run.optimizers[1].orthogonalize)
    train_model = torch.compile(run.trainee, dynamic=False) if compiled else run.trainee
    record.log(f"record: {record.path}")
    log_run_header(record.log, run, args, env, compiled)
    remove_stale_temporaries(record, args)
    checkpoints = Checkpoints(record, run.model, run.optimizers, args, env)

    stop = StopRequest()  # until the summary is written: a second signal then ends the run without a traceback
    try:
        outcome = train(run, train_model, args, env, record, checkpoints, stop)
        if outcome.status != "interrupted":
            log_peak_memory(record.log, env.device)
            if outcome.status == "failed":
                record.log(f"status: failed reason: {outcome.reason}")
            if args.save_checkpoint != "off":
                checkpoints.save(outcome.step, "final", run.train_time_ms,
                                 weights_only=args.save_checkpoint == "weights")
            record.log(f"add it to the records table: python tools/records.py table --write"
                       f"{' --include_local' if args.track == 'local' else ''}")
        record.log(f"summary: {json.dumps(run_summary(outcome, run, args, env, record, checkpoints))}")
    except KeyboardInterrupt:  # the second signal, after training ended
        record.log("status: interrupted while writing the final checkpoint or the summary")
        return 130
    finally:
        stop.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(ok=0, failed=1, interrupted=130)[outcome.status]


# -----------------------------------------------------------------------------------------------------------------
# Feature registration: the modules of FEATURE_NAMES import the definitions above, so they load last. Hyperparameters
# becomes every flag: the core's (the class at the top) and each feature's Flags, in that order.

FEATURES[:] = load_features()


@dataclass
class Hyperparameters(*reversed(feature_hooks("Flags")), Hyperparameters):
    pass


if __name__ == "__main__":
    sys.exit(main())
