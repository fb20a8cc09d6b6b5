"""Namespaces joined by shaped veths, and the delay relay, measured with plain sockets."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wpk.deploy.netns import Topology, list_namespaces

pytestmark = pytest.mark.root
PY = sys.executable


def _ready(process: subprocess.Popen) -> str:
    line = process.stdout.readline()
    assert line.startswith("ready"), f"process did not start: {line!r}"
    return line.split()[1]


def _probe(topo: Topology, target: str, up: int, down: int) -> float:
    result = topo.run_in("a", [PY, "-m", "wpk.deploy.probe", "send", "--to", target,
                               "--up", str(up), "--down", str(down), "--repeat", "3"],
                         capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["median_ms"]


def _best_of(measure, in_time, tries: int = 3) -> float:
    """The least of up to `tries` measurements, stopping at one that `in_time` accepts: a
    busy machine only ever adds time, so a retry tells load apart from a slow link."""
    measured = []
    while len(measured) < tries and not (measured and in_time(measured[-1])):
        measured.append(measure())
    return min(measured)


@pytest.mark.parametrize("bandwidth_mbps, rtt_ms, up", [(10, 10, 150_000), (100, 20, 1_000_000)])
def test_shaped_link_gives_bandwidth_and_rtt(bandwidth_mbps, rtt_ms, up):
    down = 4000
    with Topology(["a", "b"], [bandwidth_mbps]) as topo:
        server = topo.popen("b", [PY, "-m", "wpk.deploy.probe", "serve",
                                  "--listen", "0.0.0.0:0"], stdout=subprocess.PIPE, text=True)
        server_addr = _ready(server)
        relay = topo.popen("b", [PY, "-m", "wpk.deploy.delay_relay", "--listen",
                                 f"{topo.links[0].dst_addr}:0", "--to",
                                 "127.0.0.1:" + server_addr.rsplit(":", 1)[1],
                                 "--delay-ms", str(rtt_ms / 2)], stdout=subprocess.PIPE,
                           text=True)
        relay_addr = _ready(relay)
        predicted = (up + down) * 8 / (bandwidth_mbps * 1e6) * 1e3 + rtt_ms
        measured = _best_of(lambda: _probe(topo, relay_addr, up, down),
                            lambda ms: ms <= predicted * 1.15)
        # the server is also reachable across the link without the relay: no added RTT
        unrelayed = _probe(topo, f"{topo.links[0].dst_addr}:{server_addr.rsplit(':', 1)[1]}",
                           up, down) if server_addr.startswith("0.0.0.0") else None
    assert measured == pytest.approx(predicted, rel=0.15), (measured, predicted)
    if unrelayed is not None:
        assert measured - unrelayed == pytest.approx(rtt_ms, rel=0.3, abs=2.0)


def test_relay_adds_rtt_only_once_per_round_trip():
    with Topology(["a", "b"], [1000]) as topo:
        server = topo.popen("b", [PY, "-m", "wpk.deploy.probe", "serve",
                                  "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
        server_addr = _ready(server)
        relay = topo.popen("b", [PY, "-m", "wpk.deploy.delay_relay", "--listen",
                                 f"{topo.links[0].dst_addr}:0", "--to", server_addr,
                                 "--delay-ms", "15"], stdout=subprocess.PIPE, text=True)
        relay_addr = _ready(relay)
        measured = _best_of(lambda: _probe(topo, relay_addr, 100, 100), lambda ms: ms <= 36.0)
    assert 29.0 <= measured <= 36.0, measured


def test_everything_is_removed_on_close_and_on_error():
    topo = Topology(["a", "b", "c"], [10, 10], tag="wpktest1")
    with pytest.raises(RuntimeError):
        with topo:
            sleeper = topo.popen("b", ["sleep", "60"])
            assert set(topo.namespaces.values()) <= set(list_namespaces())
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not [ns for ns in list_namespaces() if ns.startswith("wpktest1.")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert all(link.src_dev not in links and link.dst_dev not in links for link in topo.links)
