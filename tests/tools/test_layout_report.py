"""tools/layout_report.py: the counts it prints, and the places in train_gpt.py that name a feature (issue 21's
measure: one at most for every feature, besides its registration in FEATURE_NAMES)."""
from conftest import load_script

report_tool = load_script("tools/layout_report.py")


def test_the_report_counts_the_script_and_the_features(capsys):
    assert report_tool.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train_gpt.py: ") and "top-level definitions; features/: " in out
    assert "  mudd: " in out and "  mot: " in out


def test_every_feature_is_named_in_at_most_one_place():
    places = report_tool.report((report_tool.ROOT / "train_gpt.py").read_text())["places"]
    assert {"mot", "mudd", "kronecker", "paired_heads", "fp8_mlp"} <= set(places)
    assert {name: where for name, where in places.items() if len(where) > 1} == {}


def test_a_private_name_of_a_feature_is_no_place():
    """A custom op's register_fake `_` (features/fp8_mlp.py) is no name of the feature's."""
    assert report_tool.report("def f(x):\n    return [_ for _ in x]\n")["places"]["fp8_mlp"] == []


def test_a_definition_naming_a_feature_flag_is_a_place():
    script = 'def f(args):\n    """--mot in a docstring is no place"""\n    return args.mot_heads  # nor a comment\n'
    assert report_tool.report(script)["places"]["mot"] == ["f"]
    assert report_tool.report('def g():\n    """--mot"""\n    return 1\n')["places"]["mot"] == []
