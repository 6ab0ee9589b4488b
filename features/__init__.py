"""Optional research ideas, one file each; train_gpt.py lists them in FEATURE_NAMES and calls them only through its
sockets (README: How the code is laid out)."""
# The core first, whoever imports a feature first: train_gpt.py loads every feature at its end, after the
# definitions the features import from it (importing a feature before the core would hand the core a half-run one).
import train_gpt  # noqa: F401
