"""wpk-emulate: a real plan served tier by tier in namespaces joined by shaped links."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from wpk.deploy.emulate import Emulation, emulated_links
from wpk.deploy.netns import list_namespaces
from wpk.errors import WpkError
from wpk.plan import load_plan

try:
    import wpk.runtime.server  # noqa: F401
    HAVE_RUNTIME = True
except ImportError:
    HAVE_RUNTIME = False

needs_runtime = pytest.mark.skipif(not HAVE_RUNTIME, reason="wpk.runtime (wpk-serve) is missing")
PY = sys.executable


@pytest.fixture(scope="module")
def resnet_model(tmp_path_factory):
    import onnx

    from wpk.examples import resnet_like

    path = tmp_path_factory.mktemp("model") / "resnet_like.onnx"
    onnx.save(resnet_like(), path)
    return path


def _plan(model, out, bandwidth: str):
    from wpk.partitioner.api import partition

    return partition(model, ["device", "edge"], links=[f"device-edge={bandwidth},5ms"],
                     use_calibration=False, out_dir=out).plan


@pytest.fixture(scope="module")
def cut_plan(resnet_model, tmp_path_factory):
    """resnet_like planned for a 100 Mbit/s link: a few layers on the device, the rest on edge."""
    out = tmp_path_factory.mktemp("cut") / "plan"
    plan = _plan(resnet_model, out, "100mbit")
    assert [t.name for t in plan.tiers] == ["device", "edge"]
    return out


def test_a_slower_link_moves_the_cut_towards_the_device(resnet_model, tmp_path):
    fast = _plan(resnet_model, tmp_path / "fast", "100mbit")
    slow = _plan(resnet_model, tmp_path / "slow", "10mbit")
    on_device = lambda plan: len(plan.tier("device").nodes)  # noqa: E731
    assert on_device(slow) > on_device(fast)
    assert sum(l.bytes for l in slow.links) < sum(l.bytes for l in fast.links)


def test_link_overrides_are_checked(cut_plan):
    plan = load_plan(cut_plan)
    links = emulated_links(plan, ["device-edge=20mbit,10ms"])
    assert (links[0].bandwidth_mbps, links[0].rtt_ms) == (20.0, 10.0)
    expected = (links[0].bytes + links[0].return_bytes) * 8 / 20e6 * 1e3 + 10.0
    assert links[0].predicted_ms() == pytest.approx(expected)
    with pytest.raises(WpkError, match="no such link"):
        emulated_links(plan, ["edge-cloud=20mbit,10ms"])
    # without overrides, the prediction is the partitioner's own number for the link
    for link, planned in zip(emulated_links(plan), plan.links):
        assert link.predicted_ms() == pytest.approx(planned.predicted_transfer_ms, rel=1e-6)


def test_links_through_unused_tiers_are_predicted_hop_by_hop(resnet_model, tmp_path):
    from wpk.graph import Graph
    from wpk.partitioner.api import partition

    nodes = [n.name for n in Graph.load(resnet_model).nodes]
    links = ["device-edge=50mbit,5ms", "edge-cloud=20mbit,20ms"]
    plan = partition(resnet_model, ["device", "edge", "cloud"], links=links,
                     pins={nodes[3]: "device", nodes[4]: "cloud"}, use_calibration=False,
                     out_dir=tmp_path / "via").plan
    assert [t.name for t in plan.tiers] == ["device", "cloud"] and plan.links[0].via == ["edge"]
    (link,) = emulated_links(plan, links)
    assert (link.bandwidth_mbps, link.rtt_ms) == (20.0, 25.0)
    assert link.predicted_ms() == pytest.approx(plan.links[0].predicted_transfer_ms, rel=1e-6)
    with pytest.raises(WpkError, match="give --link for edge-cloud"):
        emulated_links(plan, links[:1])


@pytest.mark.root
@needs_runtime
def test_measured_latency_is_within_25_percent_of_the_prediction(cut_plan):
    plan = load_plan(cut_plan)
    links = emulated_links(plan, ["device-edge=20mbit,10ms"])
    results = {}
    with Emulation(cut_plan, links) as emulation:
        for bandwidth in (20.0, 50.0):
            emulation.set_bandwidth(0, bandwidth)
            results[bandwidth] = emulation.measure(requests=4, warmup=1, compute_requests=3)
        # the tensors crossed the shaped, delayed link on the tensor link, not gRPC
        assert emulation.transports() == ["tensor link"]
        device_log = (emulation.log_dir / "wpk-serve-device.log").read_text()
        assert "using gRPC" not in device_log, device_log
    for bandwidth, result in results.items():
        assert result.measured_ms == pytest.approx(result.predicted_ms, rel=0.25), \
            (bandwidth, result.measured_ms, result.predicted_ms)
        link = next(s for s in result.stages if s.kind == "link")
        assert link.measured_ms == pytest.approx(link.predicted_ms, rel=0.25)
        assert link.note.endswith("over tensor link")
    # the link really is the shaped one: 2.5x the bandwidth, much less time on it
    assert results[20.0].measured_ms > 1.8 * results[50.0].measured_ms - 20


@pytest.mark.root
@needs_runtime
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_cleans_up_on_sigterm_and_ctrl_c(cut_plan, sig):
    # Far more requests than can finish before the signal: on a loaded machine 50 were done
    # (and the emulation gone) before the first poll saw them in flight.
    process = subprocess.Popen([PY, "-m", "wpk.deploy.emulate", str(cut_plan), "--link",
                                "device-edge=2mbit,5ms", "--requests", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"wpk{process.pid}."
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # until both tier servers run in their namespaces
            assert process.poll() is None, f"emulation ended early: {process.stderr.read()}"
            namespaces = [ns for ns in list_namespaces() if ns.startswith(prefix)]
            pids = set()
            for ns in namespaces:
                out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                     text=True).stdout
                pids |= {int(p) for p in out.split()}
            commands = [_cmdline(p) for p in pids]
            if any("emulate_client" in c and "infer" in c for c in commands):
                break  # servers and relay up, requests in flight
            time.sleep(0.2)
        assert len(pids) >= 4, "the emulation did not start measuring"
        process.send_signal(sig)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, process.stderr.read()
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert not alive, f"left running: {alive}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_without_root_it_says_so(cut_plan, monkeypatch, capsys):
    if os.geteuid() != 0:
        result = subprocess.run([PY, "-m", "wpk.deploy.emulate", str(cut_plan)],
                                capture_output=True, text=True)
    else:
        # Another user often cannot even read this interpreter's packages (they live under a
        # 0700 /root here), so run the real CLI in-process with the effective uid of nobody.
        from wpk.deploy.emulate import main as emulate_main

        monkeypatch.setattr(os, "geteuid", lambda: 65534)
        code = emulate_main([str(cut_plan)])
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess([], code, captured.out, captured.err)
    assert result.returncode == 2
    assert "needs root" in result.stderr and "Traceback" not in result.stderr
