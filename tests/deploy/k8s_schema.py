"""A schema check of the Kubernetes objects wpk emits (the fields we write, typed as the API
types them), plus the cross-object rules `kubectl apply` would not catch but a cluster would:
selectors match pod labels, probe and service ports exist, volumes name real objects."""
from __future__ import annotations

import re
from typing import Any

import jsonschema

DNS_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"

_labels = {"type": "object", "propertyNames": {"pattern": LABEL_KEY},
           "additionalProperties": {"type": "string", "pattern": LABEL_VALUE}}
_metadata = {"type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "pattern": DNS_LABEL},
                            "namespace": {"type": "string", "pattern": DNS_LABEL},
                            "labels": _labels,
                            "annotations": {"type": "object",
                                            "additionalProperties": {"type": "string"}}}}
_port_ref = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                       {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,13})$"}]}
_probe = {"type": "object", "additionalProperties": False,
          "minProperties": 1,
          "properties": {
              "grpc": {"type": "object", "required": ["port"], "additionalProperties": False,
                       "properties": {"port": {"type": "integer", "minimum": 1,
                                               "maximum": 65535},
                                      "service": {"type": "string"}}},
              "tcpSocket": {"type": "object", "required": ["port"],
                            "additionalProperties": False, "properties": {"port": _port_ref}},
              "periodSeconds": {"type": "integer", "minimum": 1},
              "timeoutSeconds": {"type": "integer", "minimum": 1},
              "failureThreshold": {"type": "integer", "minimum": 1},
              "initialDelaySeconds": {"type": "integer", "minimum": 0}},
          "oneOf": [{"required": ["grpc"]}, {"required": ["tcpSocket"]}]}
_quantity = {"oneOf": [{"type": "integer", "minimum": 0},
                       {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G)?$"}]}
_container = {
    "type": "object", "required": ["name", "image"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL},
        "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {
            "type": "object", "required": ["containerPort"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,13})$"},
                           "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                           "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}},
        "env": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
        "startupProbe": _probe, "readinessProbe": _probe, "livenessProbe": _probe,
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "requests": {"type": "object", "additionalProperties": _quantity},
            "limits": {"type": "object", "additionalProperties": _quantity}}},
        "volumeMounts": {"type": "array", "items": {
            "type": "object", "required": ["name", "mountPath"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "mountPath": {"type": "string",
                                                                     "pattern": "^/"},
                           "subPath": {"type": "string"}, "readOnly": {"type": "boolean"}}}}}}
_volume = {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {
               "name": {"type": "string", "pattern": DNS_LABEL},
               "configMap": {"type": "object", "required": ["name"],
                             "properties": {"name": {"type": "string"}}},
               "secret": {"type": "object", "required": ["secretName"], "properties": {
                   "secretName": {"type": "string"},
                   "defaultMode": {"type": "integer", "minimum": 0, "maximum": 511},
                   "items": {"type": "array", "items": {
                       "type": "object", "required": ["key", "path"],
                       "properties": {"key": {"type": "string"},
                                      "path": {"type": "string"}}}}}}},
           "oneOf": [{"required": ["configMap"]}, {"required": ["secret"]}]}

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("apps/v1", "Deployment"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "apps/v1"}, "kind": {"const": "Deployment"},
            "metadata": _metadata,
            "spec": {"type": "object", "required": ["selector", "template"],
                     "additionalProperties": False, "properties": {
                         "replicas": {"type": "integer", "minimum": 0},
                         "selector": {"type": "object", "required": ["matchLabels"],
                                      "additionalProperties": False,
                                      "properties": {"matchLabels": _labels}},
                         "template": {"type": "object", "required": ["metadata", "spec"],
                                      "additionalProperties": False, "properties": {
                                          "metadata": {"type": "object", "required": ["labels"],
                                                       "properties": {"labels": _labels}},
                                          "spec": {"type": "object",
                                                   "required": ["containers"],
                                                   "additionalProperties": False,
                                                   "properties": {
                                                       "containers": {"type": "array",
                                                                      "minItems": 1,
                                                                      "items": _container},
                                                       "volumes": {"type": "array",
                                                                   "items": _volume},
                                                       "nodeSelector": _labels}}}}}}}},
    ("v1", "Service"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"}, "kind": {"const": "Service"}, "metadata": _metadata,
            "spec": {"type": "object", "required": ["selector", "ports"],
                     "additionalProperties": False, "properties": {
                         "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                         "selector": _labels,
                         "ports": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["port"],
                             "additionalProperties": False, "properties": {
                                 "name": {"type": "string", "pattern": DNS_LABEL},
                                 "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                 "targetPort": _port_ref,
                                 "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                                 "appProtocol": {"type": "string"}}}}}}}},
    ("v1", "ConfigMap"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "data"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"},
                       "metadata": _metadata,
                       "data": {"type": "object",
                                "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"},
                                "additionalProperties": {"type": "string"}}}},
    ("v1", "Secret"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "data", "type"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "Secret"},
                       "type": {"const": "kubernetes.io/tls"}, "metadata": _metadata,
                       "data": {"type": "object", "required": ["tls.crt", "tls.key"],
                                "additionalProperties": {
                                    "type": "string", "pattern": r"^[A-Za-z0-9+/=]+$"}}}},
}


def check_documents(documents: list[dict[str, Any]]) -> None:
    """Raise AssertionError / jsonschema.ValidationError on the first problem."""
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in documents:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in SCHEMAS, f"unexpected object {key}"
        jsonschema.validate(doc, SCHEMAS[key])
        names = by_kind.setdefault(doc["kind"], {})
        assert doc["metadata"]["name"] not in names, f"duplicate {doc['kind']} name"
        names[doc["metadata"]["name"]] = doc
    for name, deployment in by_kind.get("Deployment", {}).items():
        spec = deployment["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        selector = spec["selector"]["matchLabels"]
        assert selector and all(pod_labels.get(k) == v for k, v in selector.items()), \
            f"{name}: selector does not match the pod's labels"
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            port_names = {p.get("name") for p in container.get("ports", [])}
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                assert probe, f"{name}: {probe_name} missing"
                port = (probe.get("grpc") or probe.get("tcpSocket"))["port"]
                assert port in ports or port in port_names, \
                    f"{name}: {probe_name} port {port} is not a container port"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: mount of unknown volume"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind.get("ConfigMap", {}), \
                    f"{name}: ConfigMap {volume['configMap']['name']} is not emitted"
                keys = by_kind["ConfigMap"][volume["configMap"]["name"]]["data"]
                for container in pod["containers"]:
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == volume["name"] and "subPath" in mount:
                            assert mount["subPath"] in keys, f"{name}: no key {mount['subPath']}"
            if "secret" in volume:
                secret = by_kind.get("Secret", {}).get(volume["secret"]["secretName"])
                assert secret is not None, f"{name}: Secret is not emitted"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret["data"], f"{name}: no secret key {item['key']}"
    for name, service in by_kind.get("Service", {}).items():
        matches = [d for d in by_kind.get("Deployment", {}).values() if all(
            d["spec"]["template"]["metadata"]["labels"].get(k) == v
            for k, v in service["spec"]["selector"].items())]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        container_ports = matches[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p["containerPort"], p.get("name")) for p in container_ports), \
                f"Service {name}: targetPort {target} matches no container port"
    for doc in documents:
        assert re.fullmatch(DNS_LABEL, doc["metadata"]["name"])
