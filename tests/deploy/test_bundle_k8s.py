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


def _start_sh_argv(directory, **env) -> list[str]:
    """The wpk-serve command line start.sh builds (WPK_SERVE=echo prints it)."""
    result = subprocess.run([str(directory / "start.sh")], capture_output=True, text=True,
                            env={**os.environ, "WPK_SERVE": "echo", **env}, check=True)
    return result.stdout.split()


def test_bundle_gives_every_tier_a_fixed_tensor_link_port(three_tier_plan, tmp_path):
    dirs = {d.name: d for d in bundle.write_bundle(three_tier_plan, tmp_path / "out")}
    for tier, directory in dirs.items():
        argv = _start_sh_argv(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        expose = [line for line in (directory / "Dockerfile").read_text().splitlines()
                  if line.startswith("EXPOSE")]
        # the entry tier's link serves clients on its host or LAN (wpk-bridge --tensor-link)
        assert argv[argv.index("--link-port") + 1] == "8002"
        assert manifest["link_port"] == 8002
        assert expose == ["EXPOSE 8001 8002 9090"]
        assert "tensor link 8002" in (directory / f"wpk-mlp-{tier}.service").read_text()
    argv = _start_sh_argv(dirs["edge"], WPK_LINK_PORT="9102")  # overridable like the others
    assert argv[argv.index("--link-port") + 1] == "9102"


def test_bundle_passes_a_cpu_latency_limit_only_when_one_is_set(three_tier_plan, tmp_path):
    directory = bundle.write_bundle(three_tier_plan, tmp_path / "out")[0]
    assert "--cpu-latency-us" not in _start_sh_argv(directory)
    argv = _start_sh_argv(directory, WPK_CPU_LATENCY_US="0")
    assert argv[argv.index("--cpu-latency-us") + 1] == "0"


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
        # TLS tiers pass tensors over their gRPC link: no tensor-link port anywhere
        assert "--link-port" not in _start_sh_argv(directory)
        assert "8002" not in (directory / "Dockerfile").read_text()


def test_bundle_refuses_to_overwrite(three_tier_plan, tmp_path):
    bundle.write_bundle(three_tier_plan, tmp_path / "out")
    with pytest.raises(WpkError, match="already holds a bundle"):
        bundle.write_bundle(three_tier_plan, tmp_path / "out")


def test_bundle_refuses_an_incomplete_optimized_directory(three_tier_plan, tmp_path):
    """A bundle is copied to another machine: an optimized slice missing a file is refused
    when the bundle is written, not when the tier fails to start there."""
    from wpk.optimizer import pipeline
    from wpk.plan import slice_path

    plan_dir = shutil.copytree(three_tier_plan, tmp_path / "plan")
    plan = load_plan(plan_dir)
    edge = plan.tier("edge")
    pipeline.optimize(slice_path(plan_dir, edge), plan_dir / "optimized" / "edge",
                      pipeline.Options(budget=pipeline.Budget(2), per_operator=False,
                                       openvino=False, winograd=False, samples=1))
    edge.optimized = "optimized/edge"
    plan.save(plan_dir)
    bundle.write_bundle(plan_dir, tmp_path / "whole")          # complete: written
    (plan_dir / "optimized" / "edge" / "model.onnx").unlink()
    with pytest.raises(WpkError, match="model.onnx: missing from the optimized directory"):
        bundle.write_bundle(plan_dir, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


# -- Kubernetes -------------------------------------------------------------------------------
def test_manifests_are_never_overwritten(three_tier_plan, tmp_path):
    k8s.write_manifests(three_tier_plan, tmp_path / "k")
    (tmp_path / "k" / "edge.yaml").write_text("# edited by hand\n")
    with pytest.raises(WpkError, match="already holds manifests"):
        k8s.write_manifests(three_tier_plan, tmp_path / "k")
    assert (tmp_path / "k" / "edge.yaml").read_text() == "# edited by hand\n"


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


def _ports(docs, kind):
    """{tier: {port name: (port, targetPort)}} of the Services or the containers."""
    found = {}
    for d in docs:
        if d["kind"] != kind:
            continue
        tier = d["metadata"]["labels"][k8s.LABEL_COMPONENT]
        if kind == "Service":
            found[tier] = {p["name"]: (p["port"], p["targetPort"]) for p in d["spec"]["ports"]}
        else:
            container = d["spec"]["template"]["spec"]["containers"][0]
            found[tier] = {p["name"]: p["containerPort"] for p in container["ports"]}
            found[tier]["args"] = container["args"]
    return found


def test_manifests_expose_the_tensor_link_under_the_advertised_port(three_tier_plan, tmp_path):
    """The upstream dials the host of its --next (the Service name) on the port the tier
    advertises (the one it listens on): container port, Service port and --link-port agree."""
    k8s.write_manifests(three_tier_plan, tmp_path / "k8s")
    docs = _documents(tmp_path / "k8s")
    check_documents(docs)
    services, containers = _ports(docs, "Service"), _ports(docs, "Deployment")
    for tier in ("device", "edge", "cloud"):   # the entry's serves clients (--tensor-link)
        args = containers[tier]["args"]
        assert args[args.index("--link-port") + 1] == "8002"
        assert containers[tier]["tensor-link"] == 8002
        assert services[tier]["tensor-link"] == (8002, "tensor-link")
        assert services[tier]["grpc"] == (8001, "grpc")
    # the previous tier reaches each through its Service: wpk-mlp-edge:8001, then :8002
    assert containers["device"]["args"][containers["device"]["args"].index("--next") + 1] \
        == "wpk-mlp-edge:8001"


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
            assert "--link-port" not in container["args"]  # TLS tiers use the gRPC link
    assert not any(ports.get("tensor-link") for ports in _ports(docs, "Service").values())
    assert not any(ports.get("tensor-link") for ports in _ports(docs, "Deployment").values())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_manifests(three_tier_plan, tmp_path):
    k8s.write_manifests(three_tier_plan, tmp_path / "k8s")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_documents([d for d in yaml.safe_load_all(result.stdout) if d])


# -- a bundle really runs -------------------------------------------------------------------
def _established_to(port: int) -> int:
    """Open TCP connections on this host whose remote end is 127.0.0.1:`port`."""
    count = 0
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[2] == f"0100007F:{port:04X}" and fields[3] == "01":  # ESTABLISHED
                count += 1
    return count


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

    from .conftest import free_port

    dirs = {d.name: d for d in bundle.write_bundle(three_tier_plan, tmp_path / "out")}
    plan = load_plan(three_tier_plan)
    processes = []
    link_ports = {tier: free_port() for tier in ("cloud", "edge", "device")}  # one host here
    try:
        next_address = ""
        for tier in ("cloud", "edge", "device"):  # each tier learns where the next listens
            env = {"WPK_NEXT": next_address}
            env["WPK_LINK_PORT"] = str(link_ports[tier])
            process, next_address = _start_tier(dirs[tier], env)
            processes.append(process)
        spec = plan.model.inputs[0]
        x = np.random.default_rng(1).standard_normal(spec.shape).astype(np.float32)

        async def infer():
            async with InferenceClient(next_address) as client:
                return await client.infer(plan.name, {spec.name: x}, timeout=20)

        outputs = asyncio.run(infer())
        expected = ort.InferenceSession(plan.model.file).run(None, {spec.name: x})[0]
        name = plan.model.outputs[0].name
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-5)
        # the tensors went over the tensor links, on the ports the bundles set
        assert _established_to(link_ports["edge"]) == 1
        assert _established_to(link_ports["cloud"]) == 1
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


@pytest.mark.parametrize("args, message", [
    (["--k8s", "{tmp}/k", "--namespace", "Bad_NS"], "--namespace 'Bad_NS'"),
    (["--k8s", "{tmp}/k", "--tag", "a b"], "--tag 'a b'"),
    (["--k8s", "{tmp}/k", "--registry", "bad registry!"], "--registry 'bad registry!'"),
    (["--bundle", "{tmp}/b", "--port", "9000"], "--port: only for --local"),
    (["--k8s", "{tmp}/k", "--name", "other"], "--name: only for --local"),
    (["--local", "--tls"], "--tls: only for --bundle / --k8s"),
    (["--local", "--bridge-config", "{tmp}/b.yaml"], "--bridge-config needs --mqtt"),
    (["--local", "--mqtt", "127.0.0.1:1883", "--bridge-config", "{tmp}/none.yaml"],
     "none.yaml: no such bridge config file"),
    (["--bundle", "{tmp}/afile"], "afile"),
    (["--local", "--mqtt", "127.0.0.1:1883", "--bridge-config", "{tmp}/bad.yaml"],
     "bad.yaml: malformed YAML at line"),
    (["--local", "--mqtt", "127.0.0.1:1883", "--bridge-config", "{tmp}/typo.yaml"],
     "unknown setting 'brokr' (did you mean 'broker'?)"),
])
def test_wpk_deploy_options_are_checked_before_anything_runs(three_tier_plan, tmp_path, capsys,
                                                             args, message):
    from wpk.deploy.cli import main

    (tmp_path / "afile").write_text("")
    (tmp_path / "b.yaml").write_text("model: m\n")
    (tmp_path / "bad.yaml").write_text("model: m\nroutes: [\n")
    (tmp_path / "typo.yaml").write_text("brokr: 127.0.0.1:1883\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([str(three_tier_plan), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wpk: error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "k").exists() and not (tmp_path / "b").exists()
