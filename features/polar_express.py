"""--muon_ns=polar_express (frontier recipe section 2.1; arXiv 2505.16932): Muon orthogonalizes with the Polar
Express iterations, one (a, b, c) per iteration, instead of #21's fixed quintic Newton-Schulz. Its socket: a value of
the core's --muon_ns (ORTHOGONALIZERS). Cost: the same matmuls per iteration as the quintic, at most 5 iterations.
"""
from torch import Tensor

from train_gpt import Hyperparameters


def on(args: Hyperparameters) -> bool:
    return args.muon_ns == "polar_express"


def check(args: Hyperparameters, fail):
    if on(args) and args.ns_steps > len(POLAR_EXPRESS_COEFFICIENTS):
        fail(f"--muon_ns=polar_express has coefficients for {len(POLAR_EXPRESS_COEFFICIENTS)} iterations; "
             f"--ns_steps={args.ns_steps} must be <= {len(POLAR_EXPRESS_COEFFICIENTS)}")


# Polar Express (arXiv 2505.16932; frontier recipe section 2.1): one (a, b, c) per iteration, computed for 5
# iterations with safety 2e-2 and cushion 2, so early steps grow small singular values fast and late ones settle.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def zeropower_polar_express(G: Tensor, steps: int) -> Tensor:
    """Orthogonalize each matrix in G (..., rows, cols) with the first `steps` Polar Express iterations (--muon_ns).
    The 1.02 keeps the normalized spectral norm safely below 1 (the Frobenius norm only bounds it)."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


ORTHOGONALIZERS = dict(polar_express=zeropower_polar_express)
