"""`wpk-deploy PLAN_DIR --k8s OUT`: Kubernetes manifests for a plan.

    OUT/configmap.yaml        ConfigMap wpk-<model>-plan: plan.json and each tier's view of it
    OUT/<tier>.yaml           Deployment + Service of one tier
    OUT/secrets.yaml          with --tls: one kubernetes.io/tls Secret per tier (+ ca.crt)
    OUT/kustomization.yaml    `kubectl apply -k OUT` applies everything

Each tier runs the image built from its bundle (`wpk-deploy --bundle`, Dockerfile inside),
whose /opt/wpk/... holds its slice; the plan it reads is mounted from the ConfigMap. The pod
serves the Open Inference Protocol on port 8001 and Prometheus metrics on 9090; the next tier
is reached through its Service (`wpk-<model>-<next>:8001`). Every tier also serves the
tensor link on 8002 (`--link-port`), a container port and a Service port of the same
number: the tier advertises the port it listens on, and the previous tier (or, on the first
tier, a client such as wpk-bridge --tensor-link) dials it on the Service name it uses. With
--tls tiers pass tensors over gRPC: no such port.
Node selectors and GPU requests (`nvidia.com/gpu`) come from the tier spec (`node_selector`,
`gpus`, as recorded in plan.json tiers[].hardware).

Probes: Kubernetes' gRPC probes call the standard `grpc.health.v1.Health/Check` and cannot
speak TLS, so plain-text tiers get gRPC readiness/liveness probes on the serving port, and
mutual-TLS tiers get TCP probes on it (the handshake needs a client certificate that the
kubelet does not have).
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from wpk.deploy import bundle, layout, tls
from wpk.errors import WpkError
from wpk.plan import Plan

LABEL_APP = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PLAN_MOUNT = "/etc/wpk"
TLS_MOUNT = "/etc/wpk/tls"
LINK_PORT_NAME = "tensor-link"


def _labels(plan: Plan, tier: str) -> dict[str, str]:
    return {LABEL_APP: "wpk-tier", LABEL_INSTANCE: layout.dns_label(plan.name),
            LABEL_COMPONENT: layout.dns_label(tier)}


def _plan_key(tier: str) -> str:
    return f"{layout.dns_label(tier)}.plan.json"


def configmap(plan: Plan, namespace: str | None) -> dict[str, Any]:
    data = {"plan.json": layout.dumps(plan.to_json())}
    for tier in plan.tiers:
        data[_plan_key(tier.name)] = layout.dumps(layout.tier_plan_json(plan, tier.name))
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(layout.dns_label("wpk", plan.name, "plan"), namespace,
                                  {LABEL_INSTANCE: layout.dns_label(plan.name),
                                   LABEL_PART_OF: "wpk"}),
            "data": data}


def _metadata(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _probes(use_tls: bool) -> dict[str, Any]:
    if use_tls:
        check: dict[str, Any] = {"tcpSocket": {"port": "grpc"}}
    else:
        check = {"grpc": {"port": layout.GRPC_PORT}}  # grpc probes take a number, not a name
    return {
        "startupProbe": {**check, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**check, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 3},
        "livenessProbe": {**check, "periodSeconds": 10, "timeoutSeconds": 2,
                          "failureThreshold": 3},
    }


def _resources(plan: Plan, tier: str, slice_bytes: int) -> dict[str, Any]:
    hardware = plan.tier(tier).hardware or {}
    memory_mi = max(256, int(slice_bytes * 4 / 2**20) + 128)  # weights, arena, activations
    resources: dict[str, Any] = {"requests": {"cpu": "500m", "memory": f"{memory_mi}Mi"}}
    gpus = int(hardware.get("gpus") or 0)
    if gpus > 0:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    return resources


def deployment(plan: Plan, tier: str, image: str, namespace: str | None, use_tls: bool,
               slice_bytes: int = 0) -> dict[str, Any]:
    labels = _labels(plan, tier)
    name = layout.service_name(plan, tier)
    app_root = f"{layout.INSTALL_ROOT}/{layout.dns_label(plan.name)}/{layout.dns_label(tier)}"
    nxt = layout.next_tier(plan, tier)
    args = [f"{app_root}/plan", "--tier", tier, "--host", "0.0.0.0",
            "--port", str(layout.GRPC_PORT), "--metrics-port", str(layout.METRICS_PORT)]
    if nxt is not None:
        args += ["--next", nxt.address if nxt.address else
                 f"{layout.service_name(plan, nxt.name)}:{layout.GRPC_PORT}"]
    link_port = layout.link_port(plan, tier, use_tls)
    if link_port is not None:
        args += ["--link-port", str(link_port)]
    mounts = [{"name": "plan", "mountPath": f"{app_root}/plan/plan.json",
               "subPath": _plan_key(tier), "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {
        "name": layout.dns_label("wpk", plan.name, "plan")}}]
    if use_tls:
        args += ["--tls-dir", TLS_MOUNT]
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
        volumes.append({"name": "tls", "secret": {
            "secretName": _secret_name(plan, tier), "defaultMode": 0o400,
            "items": [{"key": "ca.crt", "path": tls.CA_CERT},
                      {"key": "tls.crt", "path": f"{tier}.pem"},
                      {"key": "tls.key", "path": f"{tier}.key"}]}})
    container = {
        "name": "tier", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["wpk-serve"], "args": args,
        "ports": _container_ports(link_port),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        **_probes(use_tls),
        "resources": _resources(plan, tier, slice_bytes),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    selector = dict((plan.tier(tier).hardware or {}).get("node_selector") or {})
    if selector:
        pod_spec["nodeSelector"] = {str(k): str(v) for k, v in selector.items()}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(name, namespace, {**labels, LABEL_PART_OF: "wpk"}),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels,
                                               "annotations": {
                                                   "prometheus.io/scrape": "true",
                                                   "prometheus.io/port": str(
                                                       layout.METRICS_PORT)}},
                                  "spec": pod_spec}}}


def _container_ports(link_port: int | None) -> list[dict[str, Any]]:
    ports = [{"name": "grpc", "containerPort": layout.GRPC_PORT, "protocol": "TCP"}]
    if link_port is not None:
        ports.append({"name": LINK_PORT_NAME, "containerPort": link_port, "protocol": "TCP"})
    ports.append({"name": "metrics", "containerPort": layout.METRICS_PORT, "protocol": "TCP"})
    return ports


def service(plan: Plan, tier: str, namespace: str | None, use_tls: bool = False
            ) -> dict[str, Any]:
    labels = _labels(plan, tier)
    ports: list[dict[str, Any]] = [{"name": "grpc", "port": layout.GRPC_PORT,
                                    "targetPort": "grpc", "protocol": "TCP",
                                    "appProtocol": "grpc"}]
    link_port = layout.link_port(plan, tier, use_tls)
    if link_port is not None:  # same number as the container's: it is what the tier advertises
        ports.append({"name": LINK_PORT_NAME, "port": link_port, "targetPort": LINK_PORT_NAME,
                      "protocol": "TCP"})
    ports.append({"name": "metrics", "port": layout.METRICS_PORT, "targetPort": "metrics",
                  "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(layout.service_name(plan, tier), namespace,
                                  {**labels, LABEL_PART_OF: "wpk"}),
            "spec": {"type": "ClusterIP", "selector": labels, "ports": ports}}


def _secret_name(plan: Plan, tier: str) -> str:
    return layout.dns_label("wpk", plan.name, tier, "tls")


def secret(plan: Plan, tier: str, namespace: str | None, creds: tls.TierCredentials
           ) -> dict[str, Any]:
    encode = lambda blob: base64.b64encode(blob).decode()  # noqa: E731
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": _metadata(_secret_name(plan, tier), namespace, _labels(plan, tier)),
            "data": {"tls.crt": encode(creds.cert), "tls.key": encode(creds.key),
                     "ca.crt": encode(creds.ca)}}


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases for repeated label maps: manifests stay plain to read and diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False,
                         default_flow_style=False)


def write_manifests(plan_dir: str | Path, out: str | Path, *, registry: str | None = None,
                    tag: str = "latest", namespace: str | None = None,
                    tls_dir: str | Path | None = None) -> list[Path]:
    """Write the manifests to `out`; returns the files written."""
    plan, plan_dir = layout.load(plan_dir)
    out = Path(out)
    use_tls = tls_dir is not None
    names = ["configmap.yaml", *(f"{layout.dns_label(t.name)}.yaml" for t in plan.tiers),
             *(["secrets.yaml"] if use_tls else []), "kustomization.yaml"]
    existing = [name for name in names if (out / name).exists()]
    if existing:   # they may have been edited since: never overwritten
        raise WpkError(f"{out}: already holds manifests ({', '.join(existing)}); choose an "
                       f"empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if use_tls:
        tls_dir = bundle.prepare_tls(plan, tls_dir)
    files = {"configmap.yaml": [configmap(plan, namespace)]}
    for tier in plan.tiers:
        size = (plan_dir / tier.slice).stat().st_size if tier.slice else 0
        image = bundle.image_name(plan, tier.name, registry, tag)
        files[f"{layout.dns_label(tier.name)}.yaml"] = [
            deployment(plan, tier.name, image, namespace, use_tls, size),
            service(plan, tier.name, namespace, use_tls)]
    if use_tls:
        files["secrets.yaml"] = [secret(plan, t.name, namespace, tls.load(tls_dir, t.name))
                                 for t in plan.tiers]
    written = []
    for name, documents in files.items():
        path = out / name
        path.write_text(_dump(documents))
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": list(files)}
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    written.append(out / "kustomization.yaml")
    return written
