"""plan.json read back: every malformed file is a one-line WpkError."""
import json

import pytest

from wpk.errors import WpkError
from wpk.examples import main as examples_main
from wpk.plan import load_plan


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "not a plan"),
    ('{"version": 7}', "unsupported plan version"),
    ('{"version": 1, "tiers": [], "links": ["x"], "model": {}, "objective": {}, '
     '"predicted": {}}', "malformed plan"),
    ('{"version": 1, "tiers": [{"nope": 1}], "links": [], "model": {}, "objective": {}, '
     '"predicted": {}}', "malformed plan"),
    ('{"version": 1, "tiers": 5, "links": [], "model": {}, "objective": {}, '
     '"predicted": {}}', "malformed plan"),
    ("{", "not valid JSON"),
])
def test_malformed_plans(tmp_path, content, message):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(WpkError, match=message) as error:
        load_plan(tmp_path)
    assert "\n" not in str(error.value)


def test_examples_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert examples_main([str(blocker / "models")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wpk: error:") and len(err.splitlines()) == 1


def test_examples_are_written(tmp_path, capsys):
    assert examples_main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlp.onnx", "mobilenet_like.onnx", "resnet_like.onnx"]
    assert json.dumps(capsys.readouterr().out)
