"""The record's attention lambdas (--attn_lambdas=o; frontier recipe 3.3, record r47): v = l0 v + ve, the value
embedding at a fixed coefficient 1, and the projected output times l1 (init 1), in place of #21's v = l0 v + l1 ve.
Its socket: an --attn_lambdas form of its own (ATTN_LAMBDAS), which the core's head hooks install. Cost: the same
two scalars per attention; one multiply of the output.
"""
from torch import Tensor

from train_gpt import Hyperparameters, refuse_without_head_hooks


def on(args: Hyperparameters) -> bool:
    return args.attn_lambdas == "o"


def check(args: Hyperparameters, fail):
    if on(args):
        refuse_without_head_hooks(args, "--attn_lambdas=o", fail)


def value_lambda_r47(lambdas: Tensor, v: Tensor, ve: Tensor | None) -> Tensor:
    """r47 (the 2026 record's sa_lambdas[0]): v = l0 v + ve, the value embedding's coefficient a fixed 1."""
    return lambdas[0] * v if ve is None else lambdas[0] * v + ve


def qk_lambda_r47(lambdas: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """r47: l0 multiplies the whole QKV weight, so q and k too; RMS norm undoes it up to its eps (l0's gradient
    through q and k is that small, but it is the record's)."""
    return lambdas[0] * q, lambdas[0] * k


def output_lambda_r47(lambdas: Tensor, out: Tensor) -> Tensor:
    """r47 (the record's sa_lambdas[1], init 1, pre-multiplying W_o): out = l1 proj(y)."""
    return lambdas[1] * out


# The record's l0 multiplies its whole QKV weight; q and k are RMS-normed right after, so mostly v feels it.
ATTN_LAMBDAS = dict(o=(qk_lambda_r47, value_lambda_r47, output_lambda_r47, 1.0))
