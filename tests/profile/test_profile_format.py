"""The profile file: schema round trip, every malformed input, coverage and sha checks."""
from __future__ import annotations

import copy
import json
import warnings

import jsonschema
import pytest

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.profile_format import (ProfileMismatchWarning, load_profile, profile_schema,
                                save_profile)


@pytest.fixture
def document(example_profiles) -> dict:
    return copy.deepcopy(example_profiles["mlp"])


def test_round_trip(document, tmp_path, example_models):
    jsonschema.validate(document, profile_schema())
    path = save_profile(document, tmp_path / "sub" / "pi4.json")
    assert json.loads(path.read_text()) == document
    profile = load_profile(path)
    assert profile.path == path
    assert profile.device_name == "here"
    assert profile.provider == "CPUExecutionProvider"
    assert profile.threads == 1
    assert profile.model_name == "mlp"
    assert profile.sha256 == Graph.load(example_models["mlp"]).sha256
    assert profile.node_ms == {n["name"]: n["ms"] for n in document["nodes"]}
    assert profile.total_median_ms == document["total_ms"]["median"]
    assert profile.total_p90_ms == document["total_ms"]["p90"]
    assert profile.runs == 5
    assert profile.op_types["gemm_3"] == "Gemm"


def test_minimal_hand_written_profile(tmp_path):
    """Other tools may write just the required fields."""
    path = tmp_path / "min.json"
    path.write_text(json.dumps({
        "version": 1, "device": {"name": "x", "provider": "CPUExecutionProvider", "threads": 4},
        "model": {"name": "m", "sha256": "0" * 64}, "runs": 1, "total_ms": {"median": 1.0},
        "nodes": [{"name": "a", "ms": 0.5}, {"name": "b", "ms": 0}]}))
    profile = load_profile(path)
    assert profile.node_ms == {"a": 0.5, "b": 0.0} and profile.total_p90_ms is None


def _write(tmp_path, document) -> str:
    path = tmp_path / "pi4.json"
    path.write_text(json.dumps(document))
    return str(path)


def _broken(document, how):
    document = copy.deepcopy(document)
    how(document)
    return document


BAD = {
    "wrong version": (lambda d: d.update(version=2), "unsupported profile version 2"),
    "negative node time": (lambda d: d["nodes"][3].update(ms=-0.1), r"nodes\[3\]\.ms: -0.1"),
    "missing node time": (lambda d: d["nodes"][0].pop("ms"), r"nodes\[0\]: 'ms' is missing"),
    "string node time": (lambda d: d["nodes"][1].update(ms="fast"), r"nodes\[1\]\.ms"),
    "missing total": (lambda d: d.pop("total_ms"), "top level: 'total_ms' is missing"),
    "negative total": (lambda d: d["total_ms"].update(median=-1), r"total_ms\.median"),
    "missing nodes": (lambda d: d.pop("nodes"), "'nodes' is missing"),
    "missing version": (lambda d: d.pop("version"), "'version' is missing"),
    "bad sha256": (lambda d: d["model"].update(sha256="abc"), r"model\.sha256"),
    "zero runs": (lambda d: d.update(runs=0), "runs"),
    "no provider": (lambda d: d["device"].pop("provider"), "device: 'provider' is missing"),
    "duplicate node": (lambda d: d["nodes"].append(dict(d["nodes"][0])), "appears twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_profile(case, document, tmp_path):
    how, message = BAD[case]
    path = _write(tmp_path, _broken(document, how))
    with pytest.raises(WpkError, match=message) as info:
        load_profile(path)
    text = str(info.value)
    assert text.startswith(path) and "\n" not in text


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[]", "top level"),
    ("", "not JSON"),
])
def test_not_a_profile(content, message, tmp_path):
    path = tmp_path / "junk.json"
    path.write_text(content)
    with pytest.raises(WpkError, match=message):
        load_profile(path)


def test_not_text_missing_and_directory(tmp_path):
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(WpkError, match="bin.json: not a profile"):
        load_profile(binary)
    with pytest.raises(WpkError, match="no such profile file"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(WpkError, match="is a directory"):
        load_profile(tmp_path)


def test_save_refuses_an_invalid_document(document, tmp_path):
    document["nodes"][0]["ms"] = -1
    with pytest.raises(WpkError, match="out.json"):
        save_profile(document, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_profile_lacking_nodes(document, tmp_path, example_models):
    document["nodes"] = [n for n in document["nodes"]
                         if n["name"] not in ("relu_4", "gemm_7", "relu_8", "gemm_11")]
    path = _write(tmp_path, document)
    profile = load_profile(path)
    with pytest.raises(WpkError) as info:
        profile.node_times_for(Graph.load(example_models["mlp"]))
    assert str(info.value) == (f"{path}: profile lacks 4 of the model's 12 nodes "
                               "(first: relu_4, gemm_7, relu_8)")


def test_other_file_same_names_warns(document, tmp_path, example_models):
    document["model"]["sha256"] = "f" * 64
    profile = load_profile(_write(tmp_path, document))
    graph = Graph.load(example_models["mlp"])
    assert "another file" in profile.mismatch(graph)
    with pytest.warns(ProfileMismatchWarning, match="pi4.json: measured on another file"):
        times = profile.node_times_for(graph)
    assert times == [profile.node_ms[n.name] for n in graph.nodes]


def test_same_file_does_not_warn(document, tmp_path, example_models):
    profile = load_profile(_write(tmp_path, document))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile.node_times_for(Graph.load(example_models["mlp"]))
