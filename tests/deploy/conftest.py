"""Fixtures for deploy tests: root-only tests skip with the reason when we are not root."""
from __future__ import annotations

import os
import shutil
import socket

import pytest

ROOT_REASON = ("needs root for network namespaces, veth pairs and tc qdiscs "
               "(run pytest as root, e.g. in the CI container)")


def pytest_collection_modifyitems(config, items):
    missing = [b for b in ("ip", "tc") if shutil.which(b) is None]
    if os.geteuid() == 0 and not missing:
        return
    reason = ROOT_REASON if os.geteuid() != 0 else f"needs {', '.join(missing)} (iproute2)"
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TIERS_YAML = """
tiers:
  - {name: device, preset: rpi4, node_selector: {wpk.io/tier: device}}
  - {name: edge, preset: edge-cpu, node_selector: {wpk.io/tier: edge, kubernetes.io/arch: amd64}}
  - {name: cloud, preset: cloud-gpu, gpus: 2, node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}}
links:
  - {from: device, to: edge, bandwidth: 50mbit, rtt: 5ms}
  - {from: edge, to: cloud, bandwidth: 100mbit, rtt: 20ms}
"""


@pytest.fixture(scope="session")
def three_tier_plan(tmp_path_factory):
    """A small plan that uses all three tiers (pinned), with node selectors and GPUs."""
    import onnx

    from wpk.examples import mlp
    from wpk.graph import Graph
    from wpk.partitioner.api import partition

    root = tmp_path_factory.mktemp("plan3")
    model = root / "mlp.onnx"
    onnx.save(mlp(features=64, hidden=(64, 64, 32, 32)), model)
    (root / "tiers.yaml").write_text(TIERS_YAML)
    nodes = [n.name for n in Graph.load(model).nodes]
    pins = {nodes[0]: "device", nodes[len(nodes) // 2]: "edge", nodes[-1]: "cloud"}
    partition(model, tiers_file=root / "tiers.yaml", pins=pins, use_calibration=False,
              out_dir=root / "plan")
    return root / "plan"
