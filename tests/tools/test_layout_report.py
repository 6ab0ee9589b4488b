"""tools/layout_report.py: the counts it prints, and the places in train_gpt.py that name MoT, MUDD or Kronecker
(issue 21's measure: one each at most, besides their registration in FEATURE_NAMES)."""
from conftest import load_script

report_tool = load_script("tools/layout_report.py")


def test_the_report_counts_the_script_and_the_features(capsys):
    assert report_tool.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train_gpt.py: ") and "top-level definitions; features/: " in out
    assert "  mudd: " in out and "  mot: " in out


def test_mot_mudd_and_kronecker_are_named_in_at_most_one_place():
    places = report_tool.report((report_tool.ROOT / "train_gpt.py").read_text())["places"]
    assert {name: len(places[name]) <= 1 for name in ("mot", "mudd", "kronecker")} == \
        dict(mot=True, mudd=True, kronecker=True), places


def test_a_definition_naming_a_feature_flag_is_a_place():
    script = 'def f(args):\n    """--mot in a docstring is no place"""\n    return args.mot_heads  # nor a comment\n'
    assert report_tool.report(script)["places"]["mot"] == ["f"]
    assert report_tool.report('def g():\n    """--mot"""\n    return 1\n')["places"]["mot"] == []
