"""How train_gpt.py and features/ are laid out (issue 21): line and definition counts, and for each feature the
places in train_gpt.py that still name it.

    python tools/layout_report.py            # this checkout
    python tools/layout_report.py --rev a3dd674   # train_gpt.py at a commit (features as they are here)

A place is a top-level definition of train_gpt.py whose code names one of the feature's flags or of the names its
file defines (socket names left out: every feature has them), as an identifier, an attribute or a "--flag" string.
Comments and docstrings are not code; the preset dicts (SMOKE, FRONTIER, PRESETS) and FEATURE_NAMES are data.
"""
import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = {"SMOKE", "FRONTIER", "PRESETS", "FEATURE_NAMES", "FEATURES"}


def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def code_words(source: str, node: ast.AST) -> set[str]:
    """Identifiers, attribute names and --flag mentions in a definition's code (no comments, no docstrings)."""
    words = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            words.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            words.add(sub.attr)
        elif isinstance(sub, ast.keyword) and sub.arg:
            words.add(sub.arg)
    docstrings = {id(n.body[0].value) for n in ast.walk(node)
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in docstrings:
            words |= set(re.findall(r"--(\w+)", sub.value))
    return words


def feature_names(path: Path, sockets: set[str]) -> set[str]:
    """A feature's flag names and the public names its file defines, less the socket names (a private name, such as
    the `_` of a custom op's register_fake, is no name a reader would take for the feature's)."""
    tree = ast.parse(path.read_text())
    names = top_level_names(tree)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Flags":
            names |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    return {name for name in names - sockets if not name.startswith("_")}


def report(script: str) -> dict:
    tree = ast.parse(script)
    import train_gpt
    sockets = set(train_gpt.SOCKETS) | {"Hyperparameters"}
    definitions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    words = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]
        if names and not set(names) & DATA:
            words[names[0] if names else "<statement>"] = code_words(script, node)
    features = sorted(p for p in (ROOT / "features").glob("*.py") if p.name != "__init__.py")
    places = {}
    for path in features:
        own = feature_names(path, sockets)
        places[path.stem] = sorted(name for name, used in words.items() if used & own)
    return dict(lines=len(script.splitlines()), definitions=len(definitions),
                feature_lines=sum(len(p.read_text().splitlines()) for p in features), features=len(features),
                places=places)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="", help="read train_gpt.py at this git commit (default: the working tree)")
    args = parser.parse_args(argv)
    if args.rev:
        out = subprocess.run(["git", "show", f"{args.rev}:train_gpt.py"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: git show {args.rev}:train_gpt.py failed: {out.stderr.strip()}")
        script = out.stdout
    else:
        script = (ROOT / "train_gpt.py").read_text()
    r = report(script)
    print(f"train_gpt.py{f' at {args.rev}' if args.rev else ''}: {r['lines']:,} lines, {r['definitions']} top-level "
          f"definitions; features/: {r['feature_lines']:,} lines in {r['features']} files")
    for name, where in r["places"].items():
        print(f"  {name}: {len(where)} place(s) in train_gpt.py{': ' + ', '.join(where) if where else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
