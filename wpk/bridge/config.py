"""What a bridge is told: the broker, the pipeline, and one route per subscription."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from wpk.cli_args import split_host_port
from wpk.errors import WpkError, refuse_unknown_choice

from .formats import INPUT_FORMATS, RESULT_FORMATS
from .topics import TopicTemplate, check_filter

QUEUE_POLICIES = ("block", "drop-oldest")
MAX_RECEIVE = 65535  # MQTT v5 Receive Maximum upper bound


def parse_address(text: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT` (or `HOST` with a default port) -> (host, port); WpkError if malformed."""
    try:
        return split_host_port(text if ":" in text or not default_port
                               else f"{text}:{default_port}")
    except argparse.ArgumentTypeError:
        raise WpkError(f"{what} {text!r}: expected HOST:PORT") from None


@dataclass
class Route:
    """One subscription: which topics, how to read them, which model, where results go."""

    subscribe: str
    publish: str | None = None
    format: str = "json"
    model: str | None = None
    result: str = "json"          # result payload: json (with metadata) | raw | npy
    input: str | None = None      # raw/npy: the model input the tensor feeds (one-input default)
    output: str | None = None     # raw/npy results: which output to send (one-output default)
    metrics: list[str] | None = None  # sparkplug: metric order for a one-input model

    def check(self) -> None:
        check_filter(self.subscribe)
        if self.publish is None:
            raise WpkError(f"subscription {self.subscribe!r}: no --publish topic template")
        TopicTemplate(self.publish).check_against(self.subscribe)
        where = f"subscription {self.subscribe!r}"
        refuse_unknown_choice(self.format, INPUT_FORMATS, "format", where)
        refuse_unknown_choice(self.result, RESULT_FORMATS, "result format", where)
        if not self.model:
            raise WpkError(f"subscription {self.subscribe!r}: no --model")
        if self.format == "sparkplug" and not self.subscribe.startswith(("spBv1.0/", "+/", "#")):
            raise WpkError(f"subscription {self.subscribe!r}: Sparkplug B topics start with "
                           "spBv1.0/")


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "wpk-bridge"
    username: str | None = None
    password: str | None = None
    tls: bool = False                # TLS with the system's CA certificates
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False       # skip the server hostname check (self-signed test setups)
    keepalive_s: int = 30
    # MQTT v5 Session Expiry: 0xFFFFFFFF = the broker keeps our session (and queued QoS 1
    # inputs) however long the bridge is away. 0 would end it at every disconnect.
    session_expiry_s: int = 0xFFFFFFFF
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


@dataclass
class BridgeConfig:
    broker: BrokerConfig
    pipeline: str                    # HOST:PORT of the pipeline's first tier (KServe v2 gRPC)
    pipeline_stream: bool = False    # an earlier name for pipeline_tensor_link (warns)
    pipeline_tensor_link: bool = False   # the entry tier's tensor link (wpk tiers; plain TCP)
    # Mutual TLS to the entry tier (tiers served with wpk-serve --tls-dir): the directory
    # wpk-deploy --tls writes, the identity whose NAME.pem/NAME.key the bridge presents, and
    # the entry tier's name its certificate is checked against.
    pipeline_tls: str | None = None
    pipeline_identity: str = "bridge"
    pipeline_server_name: str | None = None
    routes: list[Route] = field(default_factory=list)
    queue_size: int = 1000           # inputs held while the pipeline is slow or away
    queue_policy: str = "block"      # block: the broker keeps the rest; drop-oldest: count+drop
    max_in_flight: int = 8           # concurrent requests to the pipeline
    result_qos: int = 1              # 2: each result reaches the broker exactly once
    error_topic: str | None = None   # default wpk/bridge/<client_id>/errors
    retry_max_s: float = 2.0         # cap of the backoff between retries to the pipeline
    stats_interval_s: float = 30.0

    def check(self) -> None:
        if not self.routes:
            raise WpkError("no --subscribe given: nothing to bridge")
        for route in self.routes:
            route.check()
        if self.queue_policy not in QUEUE_POLICIES:
            raise WpkError(f"--queue-policy {self.queue_policy!r}: choose from "
                           f"{', '.join(QUEUE_POLICIES)}")
        if not 1 <= self.queue_size <= MAX_RECEIVE - 1:
            raise WpkError(f"--queue-size {self.queue_size}: must be 1..{MAX_RECEIVE - 1}")
        if self.max_in_flight < 1:
            raise WpkError("--max-in-flight must be at least 1")
        if self.result_qos not in (1, 2):
            raise WpkError(f"--result-qos {self.result_qos}: 1 (at least once) or 2 (exactly "
                           "once to the broker)")
        if bool(self.broker.tls_cert) != bool(self.broker.tls_key):
            raise WpkError("--tls-cert and --tls-key go together")
        broker_tls = self.broker.tls or self.broker.tls_ca or self.broker.tls_cert
        if self.broker.tls_insecure and not broker_tls:
            raise WpkError("--tls-insecure relaxes TLS to the broker: add --tls (or --tls-ca)")
        if self.pipeline_tensor_link and self.pipeline_tls:
            raise WpkError("--tensor-link with --pipeline-tls: the tensor link is plain TCP; "
                           "a TLS entry tier is reached over gRPC (drop --tensor-link)")
        if self.error_topic is not None and ("+" in self.error_topic or
                                             "#" in self.error_topic):
            raise WpkError(f"--error-topic {self.error_topic!r}: a topic to publish to has no "
                           f"wildcards")

    @property
    def errors_to(self) -> str:
        return self.error_topic or f"wpk/bridge/{self.broker.client_id}/errors"
