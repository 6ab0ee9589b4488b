"""Download FineWeb-10B, already GPT-2 tokenized, from the Hugging Face dataset repo kjj0/fineweb10B-gpt2.

    python data/cached_fineweb10B.py 9    # the val shard + the first 9 train shards (100M tokens each, 900M total)

Files land in data/fineweb10B/ (next to this script) unless --out_dir says otherwise; files already there are
skipped, so an interrupted download resumes by running the same command again. With no network, make shards from
local text instead with data/tokenize_text.py.
"""

import argparse
import sys
from pathlib import Path

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103  # fineweb_train_000001.bin .. fineweb_train_000103.bin in that repo
DEFAULT_OUT_DIR = Path(__file__).parent / "fineweb10B"


class DownloadError(RuntimeError):
    pass


def shard_names(n: int) -> list[str]:
    """The val shard plus the first n train shards (train numbering starts at 1)."""
    if not 0 <= n <= NUM_TRAIN_SHARDS:
        raise ValueError(f"number of train shards must be between 0 and {NUM_TRAIN_SHARDS} "
                         f"(the number of train shards in {REPO_ID}), got {n}")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)]


def download(n: int, out_dir: Path = DEFAULT_OUT_DIR, hf_hub_download=None) -> list[Path]:
    """Fetches shard_names(n) into out_dir and returns their paths. hf_hub_download is injectable for tests."""
    names = shard_names(n)
    if hf_hub_download is None:
        from huggingface_hub import hf_hub_download  # lazy: --help and the tests need no huggingface_hub
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        # hf_hub_download moves a file into local_dir only once it is complete, so a present file is a whole one.
        if (out_dir / name).exists():
            print(f"{name}: already present, skipping", file=sys.stderr)
            continue
        try:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out_dir)
        except Exception as e:
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            raise DownloadError(
                f"Could not download {name} from the Hugging Face dataset repo {REPO_ID} ({detail}). "
                "Check your network connection; if you use a mirror set HF_ENDPOINT to it, and make sure "
                "HF_HUB_OFFLINE is not set to 1. Without network you can train on local text instead: "
                "python data/tokenize_text.py INPUT.txt|INPUT.jsonl[.gz] --out_dir data/local/NAME "
                "writes shards in the same format.") from e
    return [out_dir / name for name in names]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=9, metavar="N",
                        help=f"number of 100M-token train shards, 0..{NUM_TRAIN_SHARDS} (default 9)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="default: data/fineweb10B")
    args = parser.parse_args(argv)
    if not 0 <= args.n <= NUM_TRAIN_SHARDS:
        parser.error(f"N must be between 0 and {NUM_TRAIN_SHARDS} (the number of train shards in {REPO_ID})")
    try:
        paths = download(args.n, args.out_dir)
    except DownloadError as e:
        sys.exit(f"error: {e}")
    print(f"{len(paths)} shards in {args.out_dir}")


if __name__ == "__main__":
    main()
