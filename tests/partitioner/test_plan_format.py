"""plan.json read back: version 1 files load and round-trip byte for byte; every malformed
file is a one-line WpkError naming the file and the field."""
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from wpk.errors import WpkError
from wpk.examples import main as examples_main
from wpk.json_schema import load_schema
from wpk.plan import Objective, Plan, SourceModel, load_plan
from wpk.tensor_spec import TensorSpec

# plan.json files written by wpk-partition before the plan had types (mlp from wpk-examples):
# two edge profiles (machine, profile, measured costs), and results delivered to the cloud
# through a relay tier with an fp16+zstd link
V1_PLANS = sorted((Path(__file__).parent / "data").glob("plan_v1_*.json"))


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "not a plan"),
    ('{"version": 7}', "unsupported plan version"),
    ('{"version": 1, "tiers": [], "links": ["x"], "model": {}, "objective": {}, '
     '"predicted": {}}', "plan.json: model: 'name' is missing"),
    ('{"version": 1, "tiers": [], "links": [], "model": {"name": "m"}, "objective": {}, '
     '"predicted": {}}', "plan.json: tiers: \\[\\] should be non-empty"),
    ('{"version": 1, "tiers": 5, "links": [], "predicted": {}}',
     "plan.json: top level: 'model' is missing"),
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


def _v1(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", V1_PLANS, ids=lambda p: p.stem)
def test_version_1_plans_load_and_round_trip_byte_for_byte(path):
    plan = Plan.from_json(_v1(path), str(path))
    assert isinstance(plan.model, SourceModel) and isinstance(plan.objective, Objective)
    assert all(isinstance(spec, TensorSpec) for spec in plan.tensors.values())
    assert json.dumps(plan.to_json(), indent=2) + "\n" == path.read_text()


@pytest.mark.parametrize("path", V1_PLANS, ids=lambda p: p.stem)
def test_version_1_plans_load_from_a_directory(tmp_path, path):
    shutil.copy(path, tmp_path / "plan.json")
    for tier in _v1(path)["tiers"]:
        if tier["slice"]:
            (tmp_path / tier["slice"]).write_bytes(b"")
    plan = load_plan(tmp_path)
    assert plan.name == "mlp" and plan.tier(plan.objective.deliver_to)


def test_the_schema_accepts_what_the_partitioner_writes(tmp_path, mlp_path):
    from wpk.partitioner.api import partition

    result = partition(mlp_path, ["device", "edge", "cloud"], use_calibration=False,
                       out_dir=tmp_path, verify=False)
    jsonschema.validate(json.loads((tmp_path / "plan.json").read_text()), load_schema("plan"))
    assert load_plan(tmp_path).to_json() == result.plan.to_json()


def test_model_objective_and_tensors_read_as_typed_records():
    """The plan's model, objective and tensors are records with attributes (the dict-style
    reads of format version 0 are gone)."""
    plan = Plan.from_json(_v1(V1_PLANS[0]))
    first = plan.model.inputs[0]
    assert (first.name, first.shape, first.dtype) == ("features", (1, 2048), "float32")
    assert first.to_json() == {"name": "features", "shape": [1, 2048], "dtype": "float32"}
    assert plan.model.sha256 is not None
    assert plan.objective.deliver_to == plan.to_json()["objective"]["deliver_to"]
    spec = plan.tensors["features"]
    assert spec.shape == (1, 2048) and spec.nbytes == 8192
    with pytest.raises(TypeError):
        plan.model["inputs"]  # noqa: B018


def _broken(mutate) -> dict:
    data = _v1(V1_PLANS[0])
    mutate(data)
    return data


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["model"].pop("name"), "model: 'name' is missing"),
    (lambda d: d["model"].update(sha256=5), "model.sha256: 5 is not of type"),
    (lambda d: d["objective"].update(name="fastest"), "objective.name: 'fastest' is not one of"),
    (lambda d: d["tiers"][1].update(slice=3), "tiers[1].slice: 3 is not of type"),
    (lambda d: d["tiers"][0].update(colour="red"), "tiers[0]: unknown field 'colour'"),
    (lambda d: d["links"][0].pop("from"), "links[0]: 'from' is missing"),
    (lambda d: d["links"][0].update(codec="gzip"), "links[0].codec: unknown codec 'gzip'"),
    (lambda d: d["tensors"]["features"].update(shape=["N", 2048]),
     "tensors.features.shape[0]: 'N' is not of type 'integer'"),
    (lambda d: d["model"]["inputs"][0].update(dtype="floaty"),
     "model.inputs[0].dtype: 'floaty' is not a numpy dtype name"),
    (lambda d: d.update(predicted=[]), "predicted: [] is not of type 'object'"),
])
def test_a_bad_field_is_one_line_naming_file_and_field(tmp_path, mutate, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_broken(mutate)))
    with pytest.raises(WpkError) as error:
        load_plan(tmp_path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_a_bad_plan_is_one_line_from_a_cli(tmp_path, capsys):
    from wpk.optimizer.cli import main as optimize_main

    (tmp_path / "plan.json").write_text(json.dumps(_broken(
        lambda d: d["objective"].update(privacy="some"))))
    assert optimize_main([str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "objective.privacy" in err and "plan.json" in err


def test_a_hand_written_plan_with_only_a_model_name_loads(tmp_path):
    """Before the plan had types any model and objective dicts loaded; the name is needed."""
    (tmp_path / "plan.json").write_text(json.dumps({
        "version": 1, "model": {"name": "small"}, "objective": {}, "tiers": [{
            "name": "edge", "slice": None, "nodes": [], "inputs": ["x"], "outputs": ["x"],
            "slice_inputs": [], "slice_outputs": [], "forward": [], "results": ["x"],
            "passthrough": ["x"], "predicted_compute_ms": 0}], "links": [], "predicted": {}}))
    plan = load_plan(tmp_path)
    assert plan.model == SourceModel("small") and plan.objective == Objective()
    assert Plan(model={"name": "small"}, objective={}, tiers=plan.tiers, links=[],
                predicted={}).to_json() == plan.to_json()
