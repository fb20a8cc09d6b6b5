"""Bundles (one directory per tier) and Kubernetes manifests written from a real plan."""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from wpk.deploy import bundle, k8s, tls
from wpk.errors import WpkError
from wpk.plan import Plan, load_plan

from .k8s_schema import check_documents


def _documents(directory):
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


# -- bundle -----------------------------------------------------------------------------------
def test_bundle_has_one_self_contained_directory_per_tier(three_tier_plan, tmp_path):
    plan = load_plan(three_tier_plan)
    dirs = bundle.write_bundle(three_tier_plan, tmp_path / "out")
    assert [d.name for d in dirs] == [t.name for t in plan.tiers] == ["device", "edge", "cloud"]
    for directory, tier in zip(dirs, plan.tiers):
        own = load_plan(directory / "plan")  # loads: every slice it names is there
        assert sorted(p.name for p in (directory / "plan").iterdir()) == sorted(["plan.json", tier.slice])
        assert [t.slice for t in own.tiers if t.slice] == [tier.slice]
        assert [t.name for t in own.tiers] == [t.name for t in plan.tiers]
        start = directory / "start.sh"
        assert os.access(start, os.X_OK)
        assert subprocess.run(["sh", "-n", str(start)]).returncode == 0
        unit = configparser.ConfigParser(interpolation=None)
        unit.read(directory / f"wpk-mlp-{tier.name}.service")
        assert unit["Service"]["ExecStart"] == f"/opt/wpk/mlp/{tier.name}/start.sh"
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        manifest = json.loads((directory / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    nexts = [json.loads((d / "manifest.json").read_text())["next"] for d in dirs]
    assert nexts == ["edge:8001", "cloud:8001", None]


def test_bundle_settings_resolve_like_the_server_sees_them(three_tier_plan, tmp_path):
    directory = bundle.write_bundle(three_tier_plan, tmp_path / "out")[1]  # edge
    script = f'. "{directory}/tier.env"; echo "$WPK_TIER $WPK_PORT $WPK_NEXT [$WPK_TLS_DIR]"'
    default = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
    assert default.strip() == "edge 8001 cloud:8001 []"
    env = {**os.environ, "WPK_PORT": "9100", "WPK_NEXT": "10.0.0.9:8001"}
    changed = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert changed.stdout.strip() == "edge 9100 10.0.0.9:8001 []"


def test_bundle_with_tls_ships_each_tier_its_own_key_and_never_the_ca_key(three_tier_plan,
                                                                          tmp_path):
    dirs = bundle.write_bundle(three_tier_plan, tmp_path / "out", tls_dir=tmp_path / "pki")
    assert (tmp_path / "pki" / "ca.key").exists()
    for directory in dirs:
        names = sorted(p.name for p in (directory / "tls").iterdir())
        assert names == sorted(["ca.pem", f"{directory.name}.pem", f"{directory.name}.key"])
        assert not list(directory.rglob("ca.key"))
        tls.load(directory / "tls", directory.name)
        assert "WPK_TLS_DIR=\"${WPK_TLS_DIR-tls}\"" in (directory / "tier.env").read_text()


def test_bundle_refuses_to_overwrite(three_tier_plan, tmp_path):
    bundle.write_bundle(three_tier_plan, tmp_path / "out")
    with pytest.raises(WpkError, match="already holds a bundle"):
        bundle.write_bundle(three_tier_plan, tmp_path / "out")


# -- Kubernetes -------------------------------------------------------------------------------
def test_manifests_pass_the_schema_check(three_tier_plan, tmp_path):
    files = k8s.write_manifests(three_tier_plan, tmp_path / "k8s", registry="reg.local/wpk",
                                namespace="plant-7")
    kustomization = yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        f.name for f in files if f.name != "kustomization.yaml")
    docs = _documents(tmp_path / "k8s")
    check_documents(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap"] + ["Deployment"] * 3 + ["Service"] * 3
    assert {d["metadata"]["namespace"] for d in docs} == {"plant-7"}


def test_manifests_take_node_selectors_gpus_and_wiring_from_the_plan(three_tier_plan, tmp_path):
    k8s.write_manifests(three_tier_plan, tmp_path / "k8s")
    docs = _documents(tmp_path / "k8s")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == ["wpk-mlp-cloud", "wpk-mlp-device", "wpk-mlp-edge"]
    pods = {name.rsplit("-", 1)[1]: d["spec"]["template"]["spec"]
            for name, d in deployments.items()}
    assert pods["device"]["nodeSelector"] == {"wpk.io/tier": "device"}
    assert pods["edge"]["nodeSelector"] == {"wpk.io/tier": "edge", "kubernetes.io/arch": "amd64"}
    assert pods["cloud"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    containers = {tier: pod["containers"][0] for tier, pod in pods.items()}
    assert containers["cloud"]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert "limits" not in containers["device"]["resources"]
    for tier, container in containers.items():
        assert container["readinessProbe"]["grpc"] == {"port": 8001}
        assert container["livenessProbe"]["grpc"] == {"port": 8001}
    args = {tier: c["args"] for tier, c in containers.items()}
    assert args["device"][args["device"].index("--next") + 1] == "wpk-mlp-edge:8001"
    assert args["edge"][args["edge"].index("--next") + 1] == "wpk-mlp-cloud:8001"
    assert "--next" not in args["cloud"]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    full = Plan.from_json(json.loads(configmap["data"]["plan.json"]))
    assert [t.name for t in full.tiers] == ["device", "edge", "cloud"]
    edge_view = json.loads(configmap["data"]["edge.plan.json"])
    assert [t["slice"] for t in edge_view["tiers"]] == [None, "edge.onnx", None]


def test_manifests_with_tls_mount_secrets_and_probe_over_tcp(three_tier_plan, tmp_path):
    k8s.write_manifests(three_tier_plan, tmp_path / "k8s", tls_dir=tmp_path / "pki")
    docs = _documents(tmp_path / "k8s")
    check_documents(docs)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert sorted(secrets) == ["wpk-mlp-cloud-tls", "wpk-mlp-device-tls", "wpk-mlp-edge-tls"]
    for d in docs:
        if d["kind"] == "Deployment":
            container = d["spec"]["template"]["spec"]["containers"][0]
            assert container["readinessProbe"] .get("tcpSocket") == {"port": "grpc"}
            assert "--tls-dir" in container["args"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_manifests(three_tier_plan, tmp_path):
    k8s.write_manifests(three_tier_plan, tmp_path / "k8s")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_documents([d for d in yaml.safe_load_all(result.stdout) if d])


# -- a bundle really runs -------------------------------------------------------------------
def _start_tier(directory, env_extra):
    from wpk.deploy.emulate import _read_line_with

    serve = os.path.join(os.path.dirname(sys.executable), "wpk-serve")
    env = {**os.environ, "WPK_SERVE": serve, "WPK_HOST": "127.0.0.1", "WPK_PORT": "0",
           "WPK_METRICS_PORT": "0", **env_extra}
    process = subprocess.Popen([str(directory / "start.sh")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = _read_line_with(process, "ready on", 30)
    assert line, process.stderr.read() if process.poll() is not None else "no ready line"
    return process, line.split("ready on ")[1].split()[0]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                    "wpk-serve")),
                    reason="wpk-serve is not installed in this environment")
def test_bundled_tiers_started_by_their_scripts_serve_the_model(three_tier_plan, tmp_path):
    import asyncio

    import numpy as np
    import onnxruntime as ort

    from wpk.runtime.client import InferenceClient

    dirs = {d.name: d for d in bundle.write_bundle(three_tier_plan, tmp_path / "out")}
    plan = load_plan(three_tier_plan)
    processes = []
    try:
        next_address = ""
        for tier in ("cloud", "edge", "device"):  # each tier learns where the next listens
            process, next_address = _start_tier(dirs[tier], {"WPK_NEXT": next_address})
            processes.append(process)
        spec = plan.model["inputs"][0]
        x = np.random.default_rng(1).standard_normal(spec["shape"]).astype(np.float32)

        async def infer():
            async with InferenceClient(next_address) as client:
                return await client.infer(plan.name, {spec["name"]: x}, timeout=20)

        outputs = asyncio.run(infer())
        expected = ort.InferenceSession(plan.model["file"]).run(None, {spec["name"]: x})[0]
        name = plan.model["outputs"][0]["name"]
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-5)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=10)


# -- the wpk-deploy command line ------------------------------------------------------------
def test_wpk_deploy_writes_bundles_and_manifests(three_tier_plan, tmp_path, capsys):
    from wpk.deploy.cli import main

    assert main([str(three_tier_plan), "--bundle", str(tmp_path / "b"), "--tls"]) == 0
    assert (tmp_path / "b" / "pki" / "ca.key").exists()
    assert (tmp_path / "b" / "edge" / "tls" / "edge.key").exists()
    assert main([str(three_tier_plan), "--k8s", str(tmp_path / "k"), "--namespace", "x"]) == 0
    check_documents(_documents(tmp_path / "k"))
    assert "kubectl apply -k" in capsys.readouterr().out


def test_wpk_deploy_bad_plan_is_one_line(tmp_path, capsys):
    from wpk.deploy.cli import main

    assert main([str(tmp_path / "missing"), "--k8s", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wpk: error:") and "no plan here" in err and len(err.splitlines()) == 1
