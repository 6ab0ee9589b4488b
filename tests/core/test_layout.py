"""The layout of train_gpt.py and features/ (issue 21): the script reaches a feature only through its sockets, every
feature file is registered, a feature imports another only when it declares it (REQUIRES), and a run's record keeps
exactly the files it used."""
import ast
from pathlib import Path

import train_gpt as tg
from conftest import load_script

ROOT = Path(tg.__file__).resolve().parent
FEATURE_FILES = sorted(p for p in (ROOT / "features").glob("*.py") if p.name != "__init__.py")
SOCKETS = set(tg.SOCKETS)


top_level_names = load_script("tools/layout_report.py").top_level_names  # the names a file defines


def feature_imports(tree: ast.Module) -> set[str]:
    """The features a file imports (import features.x, from features import x, from features.x import ...)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("features.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "features":
            found |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
    return found


def test_every_feature_file_is_registered_in_order_of_its_requirements():
    assert [p.stem for p in FEATURE_FILES] == sorted(tg.FEATURE_NAMES)
    assert [f.__name__ for f in tg.FEATURES] == [f"features.{name}" for name in tg.FEATURE_NAMES]
    for feature in tg.FEATURES:
        name = feature.__name__.split(".")[1]
        for required in getattr(feature, "REQUIRES", ()):
            assert tg.FEATURE_NAMES.index(required) < tg.FEATURE_NAMES.index(name), (name, required)


def test_the_script_names_nothing_a_feature_defines():
    script = ast.parse((ROOT / "train_gpt.py").read_text())
    own = top_level_names(script)
    used = {n.id for n in ast.walk(script) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(script) if isinstance(n, ast.Attribute)}
    for path in FEATURE_FILES:
        theirs = top_level_names(ast.parse(path.read_text())) - own - SOCKETS
        assert not theirs & used, f"train_gpt.py names {sorted(theirs & used)} of {path.name}: use a socket"
    assert not feature_imports(script), "train_gpt.py imports a feature; it loads them by FEATURE_NAMES"


def test_a_feature_imports_only_the_core_and_the_features_it_declares():
    for path in FEATURE_FILES:
        module = next(f for f in tg.FEATURES if f.__name__ == f"features.{path.stem}")
        imported = feature_imports(ast.parse(path.read_text()))
        assert imported <= set(getattr(module, "REQUIRES", ())), f"{path.name} imports {sorted(imported)} undeclared"


def test_a_record_keeps_the_script_the_kernels_and_the_features_the_run_uses():
    default = tg.Hyperparameters()
    assert tg.run_code_files(default) == ["train_gpt.py", "kernels.py"]
    mot = tg.apply_overrides(tg.Hyperparameters(), ["--mot=cross"])
    assert tg.run_code_files(mot) == ["train_gpt.py", "kernels.py", "features/mot.py"]
    assert all((ROOT / name).exists() for name in tg.run_code_files(mot))


def test_a_core_name_a_feature_imports_is_not_taken_for_its_socket():
    """features/moe.py imports the core's activation() to build its experts; feature_hooks must not call that as a
    socket of moe (it would call itself)."""
    import features.learned_gelu
    import features.moe
    assert features.moe.activation is tg.activation
    assert tg.feature_hooks("activation") == [features.learned_gelu.activation]


def test_the_readme_worked_example_is_a_working_feature(monkeypatch):
    """README's features/relu3.py, registered: --mlp_act=relu3 passes the checks, builds its activation in every
    block's MLP, trains a step, and its file would be kept in the record."""
    import re
    import sys
    import types

    import torch
    text = (ROOT / "README.md").read_text()
    source = re.search(r"```python\n# features/relu3.py\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("features.relu3")
    module.__file__ = str(ROOT / "features" / "relu3.py")
    exec(compile(source, "README.md: features/relu3.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "features.relu3", module)
    monkeypatch.setattr(tg, "FEATURES", [*tg.FEATURES, module])
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--mlp_act=relu3"])
    tg.check_config(args, 1)
    model = tg.build_model(args)
    assert all(type(block.mlp.act) is module.ReLU3 for block in model.blocks)
    x = torch.randn(2, 3)
    assert torch.equal(model.blocks[0].mlp.act(x), torch.relu(x) ** 3)
    assert tg.run_code_files(args)[-1] == "features/relu3.py"
    inputs = torch.randint(0, args.vocab_size, (args.seq_len + 1,))
    loss = model(inputs[:-1].int(), inputs[1:].long(), 1)
    loss.backward()
    assert torch.isfinite(loss)


def test_every_feature_file_has_its_test_file_and_tests_mirror_the_code():
    """tests/core: train_gpt.py, tests/features: one test file (or more, test_<name>_*.py) per features/<name>.py,
    tests/kernels: kernels.py, tests/tools: tools/ and data/."""
    tests = ROOT / "tests"
    assert sorted(p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["core", "features", "kernels", "tools"]
    assert not list(tests.glob("test_*.py")), "a test file outside the four folders"
    feature_tests = {p.stem for p in (tests / "features").glob("test_*.py")}
    for path in FEATURE_FILES:
        assert any(t == f"test_{path.stem}" or t.startswith(f"test_{path.stem}_") for t in feature_tests), path.name


def test_adam_groups_keep_the_order_checkpoints_hold():
    """The optimizer state of a checkpoint lists Adam's groups in order; moving features out of train_gpt.py kept
    the order of the code before (a3dd674), so its frontier checkpoints still resume."""
    args = tg.apply_overrides(tg.Hyperparameters(), ["--preset=frontier_smoke"])
    adam, _ = tg.build_optimizers(tg.build_model(args), args)
    assert [g["name"] for g in adam.param_groups] == [
        "head", "embed", "value_embeds", "scalars", "mudd", "mudd_bias", "mudd_gate", "mudd_gate_bias", "ve_gate",
        "smear_gate", "resid_lambdas", "post_lambdas"]
    kron = tg.apply_overrides(tg.Hyperparameters(), ["--preset=smoke", "--kron_mlp=both"])
    adam, _ = tg.build_optimizers(tg.build_model(kron), kron)
    assert [g["name"] for g in adam.param_groups] == ["head", "embed", "value_embeds", "scalars", "kron"]


def test_features_call_the_attention_the_tools_patch_through_the_module():
    """tools/memory_plan.py measures a GPU's attention by replacing train_gpt.attend; a feature that imported the
    function by name would keep the CPU one and be measured wrong (CI caught DC so)."""
    for path in FEATURE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "train_gpt":
                assert "attend" not in {a.name for a in node.names}, f"{path.name}: call train_gpt.attend"
