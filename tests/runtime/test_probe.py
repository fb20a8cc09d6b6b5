"""wpk-probe against real gRPC servers on 127.0.0.1 (and a shaped link in a namespace)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from .conftest import Pipeline  # noqa: E402
from .kserve_stub import StubServer  # noqa: E402

from wpk.errors import WpkError  # noqa: E402
from wpk.runtime import protocol as pb  # noqa: E402
from wpk.runtime.probe import infer_request, main, probe  # noqa: E402
from wpk.tiers import load_tiers  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_infer_request_is_a_model_infer_request():
    payload = os.urandom(70_000)
    request = pb.ModelInferRequest.FromString(infer_request("__wpk_probe__", payload))
    assert request.model_name == "__wpk_probe__"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == \
        [("probe", "UINT8", [70_000])]
    assert list(request.raw_input_contents) == [payload]
    # the same bytes read as Triton's own message class (an independent copy of the contract)
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    triton = service_pb2.ModelInferRequest.FromString(infer_request("__wpk_probe__", payload))
    assert triton.model_name == "__wpk_probe__" and triton.inputs[0].shape == [70_000]
    assert triton.raw_input_contents == [payload]


def test_probe_sends_the_payload_across():
    with StubServer() as server:
        result = probe(server.address, max_mb=1, max_seconds=5, rtt_samples=5, repeats=3)
    assert [s["bytes"] for s in result.samples] == \
        [len(infer_request("__wpk_probe__", b"x" * n)) for n in (16 << 10, 64 << 10, 256 << 10,
                                                                1 << 20)]
    # the server received every probe in full (gRPC hands over whole messages only)
    assert {s["bytes"] for s in result.samples} <= set(server.received)
    assert result.bandwidth_mbps > 0 and result.rtt_ms > 0 and result.fixed_ms >= 0
    assert result.requests == 1 + 1 + 5 + 4 * 3
    assert result.server == "wpk (demo.edge)"


def test_links_entry_pastes_into_a_tiers_file(tmp_path, capsys):
    with StubServer(name="wpk (demo.cloud)") as server:
        assert main([server.address, "--from", "edge", "--max-mb", "1", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "links:" in printed and "to: cloud" in printed  # the tier the server named
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text("tiers:\n  - {name: edge, preset: edge-cpu}\n"
                          "  - {name: cloud, preset: cloud-gpu}\n" + printed)
    link = load_tiers(tiers_file=tiers_file).links[0]
    entry = printed.split("bandwidth: ")[1]
    assert link.bandwidth_mbps == pytest.approx(float(entry.split("mbit")[0]))
    assert link.rtt_ms == pytest.approx(float(printed.split("rtt: ")[1].split("ms")[0]))


def test_json_output(capsys):
    with StubServer() as server:
        assert main([server.address, "--json", "--max-mb", "1", "--repeats", "2",
                     "--to", "gw"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["link"]["from"] == "device" and data["link"]["to"] == "gw"
    assert data["link"]["bandwidth_mbps"] == data["bandwidth_mbps"] > 0
    assert len(data["samples"]) == 4 and data["capped_at_bytes"] is None


def test_bounded_in_requests_and_seconds():
    with StubServer() as server:
        few = probe(server.address, max_requests=12, rtt_samples=20, repeats=5, min_kb=1024)
        assert few.requests <= 12 and len(few.samples) >= 2
        start = time.perf_counter()
        quick = probe(server.address, max_seconds=0.3, max_mb=256, min_kb=1024)
        assert time.perf_counter() - start < 2.0
        assert quick.samples[-1]["bytes"] < 256 << 20


def test_server_refusing_large_messages():
    with StubServer(max_receive=300 << 10) as server:
        result = probe(server.address, max_mb=4, repeats=2)
    assert result.capped_at_bytes is not None and result.capped_at_bytes > 300 << 10
    assert all(s["bytes"] < 300 << 10 for s in result.samples)


def test_no_server_is_a_one_line_error(capsys):
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(WpkError, match="no gRPC server answers"):
        probe(address, connect_timeout=0.3)
    assert main([address, "--connect-timeout", "0.3"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["no-port"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_probe_a_wpk_tier_server(plans):
    """Against the runtime's own tier server: it names its tier, answers NOT_FOUND to every
    probe and counts the probe's bytes as received."""
    pipeline = Pipeline(plans["mlp"], metrics=True)
    try:
        result = probe(pipeline.address["edge"], max_mb=1, repeats=3, rtt_samples=5)
        text = urllib.request.urlopen(pipeline.metrics_url["edge"], timeout=5).read().decode()
    finally:
        pipeline.close()
    assert result.server == "wpk (mlp.edge)"
    assert result.bandwidth_mbps > 0 and len(result.samples) == 4
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(lines['wpk_requests_total{tier="edge",model="__wpk_probe__",code="NOT_FOUND"}']) \
        == 4 * 3
    payload = 3 * sum(16 << 10 << 2 * k for k in range(4))
    received = int(lines['wpk_bytes_total{tier="edge",direction="in"}'])
    assert payload <= received <= payload + 12 * 100  # the payloads plus message envelopes


def test_probe_without_grpc_says_what_to_install():
    script = textwrap.dedent("""
        import sys
        sys.modules["grpc"] = None
        from wpk.runtime.probe import main
        sys.exit(main(["127.0.0.1:9"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "wpk: error: wpk-probe needs grpcio: pip install 'wpk[serve]'"


NAMESPACE = f"wpkprobe{os.getpid()}"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip"),
                    reason="needs root, ip and tc")
def test_reads_a_20mbit_link_within_15_percent(tmp_path):
    """A veth pair into a namespace, shaped by tbf to 20 Mbit/s (this kernel has no netem, so
    no added delay): the probe must read the rate within 15 %."""
    veth = f"wpk{os.getpid() % 100000}"
    commands = [
        f"ip netns add {NAMESPACE}",
        f"ip link add {veth}a type veth peer name {veth}b",
        f"ip link set {veth}b netns {NAMESPACE}",
        f"ip addr add 10.213.0.1/24 dev {veth}a", f"ip link set {veth}a up",
        f"ip netns exec {NAMESPACE} ip addr add 10.213.0.2/24 dev {veth}b",
        f"ip netns exec {NAMESPACE} ip link set {veth}b up",
        f"tc qdisc add dev {veth}a root tbf rate 20mbit burst 32kbit latency 400ms",
    ]
    script = tmp_path / "serve.py"
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from kserve_stub import StubServer\n"
        "s = StubServer(bind='10.213.0.2:50077')\n"
        "s.server.start()\nprint('up', flush=True)\nsys.stdin.read()\n")
    server = None
    try:
        for command in commands:
            done = subprocess.run(command.split(), capture_output=True, text=True)
            if done.returncode != 0:  # no namespaces / veth / tbf in this environment
                pytest.skip(f"{command!r} failed: {done.stderr.strip()[:120]}")
        server = subprocess.Popen(["ip", "netns", "exec", NAMESPACE, sys.executable,
                                   str(script)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        result = probe("10.213.0.2:50077", max_mb=1, repeats=3, max_seconds=10)
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=10)
        subprocess.run(["ip", "link", "del", f"{veth}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    assert result.bandwidth_mbps == pytest.approx(20.0, rel=0.15)
