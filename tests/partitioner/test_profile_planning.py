"""Planning from measured profiles: known optima by construction, candidates, top, pins."""
import json

import pytest

from wpk.graph import Graph
from wpk.partitioner.cli import main

FAST_LINKS = ["--link", "device-edge=1gbit,0.1ms", "--link", "edge-cloud=1mbit,200ms"]


def write_profile(path, graph, device, ms_per_node, sha256=None):
    """A hand-written profile in the documented format (docs/profile-format.md)."""
    nodes = [{"name": n.name, "op_type": n.op_type, "ms": ms_per_node} for n in graph.nodes]
    path.write_text(json.dumps({
        "version": 1,
        "device": {"name": device, "provider": "CPUExecutionProvider", "threads": 4,
                   "host": {}, "onnxruntime": "1.20.0"},
        "model": {"name": graph.name, "sha256": sha256 or graph.sha256},
        "runs": 10,
        "total_ms": {"median": ms_per_node * len(graph.nodes), "p90": ms_per_node * len(graph.nodes)},
        "nodes": nodes}))
    return path


@pytest.fixture
def profiles(mlp_path, tmp_path):
    graph = Graph.load(mlp_path)
    return graph, {
        "pi": write_profile(tmp_path / "pi.json", graph, "pi", 5.0),
        "box-a": write_profile(tmp_path / "box-a.json", graph, "box-a", 1.0),
        "box-b": write_profile(tmp_path / "box-b.json", graph, "box-b", 0.2),
    }


def plan_of(directory):
    return json.loads((directory / "plan.json").read_text())


def test_known_optimum_and_machine_choice(mlp_path, profiles, tmp_path, capsys):
    """Device 5 ms per node, edge candidates 1 ms and 0.2 ms per node, a 1 Gbit/s link:
    only the first Gemm (it reads the raw input) stays on the device; the other 11 nodes go
    to the faster edge machine, box-b. Expected latency: 5 + 11 * 0.2 + link costs."""
    graph, files = profiles
    out = tmp_path / "plan"
    code = main([str(mlp_path), "--tiers", "device,edge,cloud", *FAST_LINKS, "--no-calibrate",
                 "--profile", f"device={files['pi']}", "--profile", f"edge={files['box-a']}",
                 "--profile", f"edge={files['box-b']}", "--top", "3", "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    plan = plan_of(out)
    device, edge = plan["tiers"]
    assert device["nodes"] == [graph.nodes[0].name]
    assert len(edge["nodes"]) == 11 and edge["machine"] == "box-b"
    assert edge["profile"]["name"] == "box-b" and edge["profile"]["sha256"] == graph.sha256
    assert device["cost_source"] == "measured (pi)"
    link = plan["links"][0]
    expected = 5.0 + 11 * 0.2 + (link["bytes"] + link["return_bytes"]) * 8 / 1e9 * 1e3 + 0.1
    assert plan["predicted"]["latency_ms"] == pytest.approx(expected, rel=1e-6)
    # --top: box-b's configuration first, box-a's after it
    assert "top 3 configurations" in text
    rows = [line for line in text.splitlines() if "edge=box-" in line]
    assert "edge=box-b" in rows[0] and any("edge=box-a" in row for row in rows[1:])
    assert "measured (pi)" in text  # the table says where each tier's times come from


def test_pin_overrides_the_optimum(mlp_path, profiles, tmp_path):
    graph, files = profiles
    out = tmp_path / "plan"
    last = graph.nodes[-1].name
    assert main([str(mlp_path), "--tiers", "device,edge", "--link", "device-edge=1gbit,0.1ms",
                 "--profile", f"device={files['pi']}", "--profile", f"edge={files['box-b']}",
                 "--pin", f"{last}=device", "--no-calibrate", "-o", str(out)]) == 0
    # the output node on the device forces every node before it there too
    assert [t["name"] for t in plan_of(out)["tiers"]] == ["device"]


def test_deliver_to_cloud_is_in_latency_and_bytes(mlp_path, profiles, tmp_path):
    graph, files = profiles
    common = [str(mlp_path), "--tiers", "device,edge,cloud", "--link", "device-edge=1gbit,0.1ms",
              "--link", "edge-cloud=10mbit,20ms", "--profile", f"device={files['pi']}",
              "--profile", f"edge={files['box-b']}", "--no-calibrate",
              "--pin", f"{graph.nodes[-1].name}=edge"]   # same cut both ways
    assert main(common + ["-o", str(tmp_path / "a")]) == 0
    assert main(common + ["--deliver-to", "cloud", "-o", str(tmp_path / "b")]) == 0
    to_device, to_cloud = plan_of(tmp_path / "a"), plan_of(tmp_path / "b")
    output_bytes = 10 * 4
    assert to_device["predicted"]["bytes_beyond_edge"] == 0
    assert to_cloud["predicted"]["bytes_beyond_edge"] == output_bytes
    assert [t["nodes"] for t in to_cloud["tiers"][:2]] == [t["nodes"] for t in to_device["tiers"]]
    # one way: the result's trip edge -> cloud (40 B at 10 Mbit/s + RTT/2) replaces its trip
    # back edge -> device (40 B at 1 Gbit/s + RTT/2)
    to_cloud_trip = output_bytes * 8 / 10e6 * 1e3 + 20 / 2
    back_to_device = output_bytes * 8 / 1e9 * 1e3 + 0.1 / 2
    assert to_cloud["predicted"]["latency_ms"] == pytest.approx(
        to_device["predicted"]["latency_ms"] - back_to_device + to_cloud_trip, rel=1e-6)


def test_profile_lacking_nodes_is_one_line_error(mlp_path, tmp_path, capsys):
    graph = Graph.load(mlp_path)
    path = write_profile(tmp_path / "p.json", graph, "pi", 1.0)
    document = json.loads(path.read_text())
    document["nodes"] = document["nodes"][:4]
    path.write_text(json.dumps(document))
    assert main([str(mlp_path), "--profile", f"device={path}", "--no-calibrate",
                 "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks 8 of the model's 12 nodes" in err


def test_other_file_warns_but_plans(mlp_path, tmp_path, capsys):
    graph = Graph.load(mlp_path)
    path = write_profile(tmp_path / "p.json", graph, "pi", 1.0, sha256="0" * 64)
    assert main([str(mlp_path), "--profile", f"device={path}", "--no-calibrate",
                 "-o", str(tmp_path / "o")]) == 0
    assert "another file" in capsys.readouterr().out


def test_profile_for_unknown_tier(mlp_path, profiles, tmp_path, capsys):
    _, files = profiles
    assert main([str(mlp_path), "--profile", f"fog={files['pi']}", "--no-calibrate",
                 "-o", str(tmp_path / "o")]) == 2
    assert "unknown tier 'fog'" in capsys.readouterr().err


def test_profile_local_and_profile_file_give_the_same_plan(mlp_path, tmp_path):
    """--profile-local is "wpk-profile here, then plan with the file": same code path."""
    from wpk.profiling import profile_model, save_profile

    save_profile(profile_model(mlp_path, runs=5, warmup=1, progress=False, name="here"),
                 tmp_path / "here.json")
    # A link this slow keeps the decision far from measurement noise.
    slow = ["--link", "device-edge=100kbit,50ms", "--no-calibrate", "--tiers", "device,edge"]
    assert main([str(mlp_path), *slow, "--profile", f"device={tmp_path / 'here.json'}",
                 "-o", str(tmp_path / "file")]) == 0
    assert main([str(mlp_path), *slow, "--profile-local", "device",
                 "-o", str(tmp_path / "local")]) == 0
    from_file, local = plan_of(tmp_path / "file"), plan_of(tmp_path / "local")
    assert [t["nodes"] for t in from_file["tiers"]] == [t["nodes"] for t in local["tiers"]]
    assert from_file["tiers"][0]["cost_source"].startswith("measured")
    assert local["tiers"][0]["cost_source"] == "measured (local-device)"
    # (the two measurements' times differ run to run on a shared machine; the cut does not)
