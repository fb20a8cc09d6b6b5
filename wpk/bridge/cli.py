"""wpk-bridge: feed MQTT inputs into a deployed wpk pipeline and publish the results.

One subscription:
  wpk-bridge --broker 127.0.0.1:1883 --pipeline 127.0.0.1:8001 --model resnet_like \\
      --subscribe 'plant/+/camera' --format raw --publish 'plant/{1}/inference'

Several subscriptions: each --subscribe starts a route; --format, --publish, --model,
--result, --input, --output and --metrics after it apply to that route; given before the first
--subscribe they are defaults for all routes:
  wpk-bridge --broker ... --pipeline ... --model mlp --result json \\
      --subscribe 'plant/+/vibration' --format npy  --publish 'plant/{1}/health' \\
      --subscribe 'spBv1.0/plant/+/+/+' --format sparkplug --publish 'plant/{4}/health'
A YAML file (--config) can hold the same settings; command-line options override it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from wpk import settings as environment
from wpk.errors import WpkError, cli_entry, one_line_warnings, refuse_unknown_keys
from wpk.files import read_yaml

from .config import QUEUE_POLICIES, BridgeConfig, BrokerConfig, Route, parse_address
from .formats import INPUT_FORMATS, RESULT_FORMATS

ROUTE_KEYS = ("publish", "format", "model", "result", "input", "output", "metrics")
# the other top-level keys of a --config file (each also a command-line flag)
SETTING_KEYS = {"broker", "pipeline", "client-id", "username", "password", "tls", "tls-ca",
                "tls-cert", "tls-key", "tls-insecure", "stream", "tensor-link", "pipeline-tls",
                "pipeline-identity", "pipeline-server-name", "queue-size", "queue-policy",
                "max-in-flight", "error-topic", "result-qos"}


# what each key of a --config file holds (the rest are strings)
INT_KEYS = {"queue-size", "max-in-flight", "result-qos"}
BOOL_KEYS = {"tls", "tls-insecure", "stream", "tensor-link"}
LIST_KEYS = {"metrics"}


def check_types(entries: dict, where: str) -> None:
    """A config value of the wrong kind (`broker: 5`, `queue-size: abc`) is one line naming
    the key, not a traceback or a silent str()."""
    for key, value in entries.items():
        if key in INT_KEYS:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif key in BOOL_KEYS:
            ok, kind = isinstance(value, bool), "true or false"
        elif key in LIST_KEYS:
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            kind = "a list of names"
        else:
            ok, kind = isinstance(value, str), "a string (quote it in YAML)"
        if not ok:
            raise WpkError(f"{where}: {key!r} must be {kind}, not {value!r}")


class _StartRoute(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.routes.append({"subscribe": values})


class _RouteOption(argparse.Action):
    """Applies to the latest --subscribe, or to all routes when given before the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest == "metrics":
            values = [m.strip() for m in values.split(",") if m.strip()]
        target = namespace.routes[-1] if namespace.routes else namespace.route_defaults
        target[self.dest] = values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-bridge", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(routes=[], route_defaults={})
    parser.add_argument("--config", type=Path, help="YAML file with these settings")
    parser.add_argument("--broker", help="MQTT broker HOST:PORT (default 127.0.0.1:1883)")
    parser.add_argument("--pipeline", help="first tier of the pipeline, HOST:PORT (KServe v2)")
    parser.add_argument("--stream", action="store_true", default=None,
                        help="an earlier name for --tensor-link (gRPC streams were removed "
                        "from wpk's client; a warning says so)")
    parser.add_argument("--tensor-link", action="store_true", default=None,
                        help="send requests over the entry tier's tensor link (wpk tiers; "
                        "fastest, for a bridge on the entry tier's host or LAN; where there is "
                        "none, unary ModelInfer calls)")
    parser.add_argument("--pipeline-tls", metavar="DIR",
                        help="mutual TLS to the entry tier with certificates from DIR (as "
                        "wpk-deploy --tls writes them)")
    parser.add_argument("--pipeline-identity", metavar="NAME",
                        help="present DIR/NAME.pem and DIR/NAME.key (default bridge)")
    parser.add_argument("--pipeline-server-name", metavar="TIER",
                        help="check the entry tier's certificate against this name "
                        "(its tier name, e.g. device)")
    route = parser.add_argument_group("routes (repeat --subscribe for several)")
    route.add_argument("--subscribe", action=_StartRoute, metavar="TOPIC_FILTER",
                       help="MQTT topic filter to take inputs from (+ and # allowed)")
    route.add_argument("--publish", action=_RouteOption, metavar="TEMPLATE",
                       help="result topic; {k} is level k (from 0) of the input topic")
    route.add_argument("--format", action=_RouteOption, choices=INPUT_FORMATS,
                       help="input payload format (default json)")
    route.add_argument("--model", action=_RouteOption, help="model name at the pipeline")
    route.add_argument("--result", action=_RouteOption, choices=RESULT_FORMATS,
                       help="result payload: json with metadata (default), raw or npy")
    route.add_argument("--input", action=_RouteOption, metavar="NAME",
                       help="raw/npy: model input the tensor feeds (default: the only one)")
    route.add_argument("--output", action=_RouteOption, metavar="NAME",
                       help="raw/npy results: output to send (default: the only one)")
    route.add_argument("--metrics", action=_RouteOption, metavar="A,B,C",
                       help="sparkplug: metric order for a one-input model")
    delivery = parser.add_argument_group("delivery")
    delivery.add_argument("--client-id", help="MQTT client id; fixed, so the broker keeps "
                          "the session (default wpk-bridge)")
    delivery.add_argument("--queue-size", type=int, help="inputs held while the pipeline is "
                          "slow or away (default 1000)")
    delivery.add_argument("--queue-policy", choices=QUEUE_POLICIES,
                          help="when the queue is full: block (the broker keeps the rest; "
                          "default) or drop-oldest")
    delivery.add_argument("--max-in-flight", type=int,
                          help="concurrent requests to the pipeline (default 8)")
    delivery.add_argument("--result-qos", type=int, choices=(1, 2),
                          help="QoS of published results: 1 (default, at least once) or 2 "
                          "(each publish reaches the broker exactly once); a result published "
                          "again for a redelivered input has the same wpk-idempotency-key")
    delivery.add_argument("--error-topic", help="where malformed inputs are reported "
                          "(default wpk/bridge/<client-id>/errors)")
    security = parser.add_argument_group("broker security")
    security.add_argument("--username")
    security.add_argument("--password", help="or set WPK_MQTT_PASSWORD")
    security.add_argument("--tls", action="store_true", default=None,
                          help="TLS with the system's CA certificates")
    security.add_argument("--tls-ca", help="CA certificate file; enables TLS")
    security.add_argument("--tls-cert", help="client certificate file (with --tls-key)")
    security.add_argument("--tls-key", help="client private key file")
    security.add_argument("--tls-insecure", action="store_true",
                          help="do not check the broker's host name against its certificate")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def load_yaml(path: Path) -> dict:
    document = read_yaml(path, "bridge config") or {}
    if not isinstance(document, dict):
        raise WpkError(f"{path}: expected a mapping of settings")
    return document


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    settings = load_yaml(args.config) if args.config else {}
    file_routes = settings.pop("routes", [])
    routes_in = args.routes or file_routes
    if not isinstance(file_routes, list):
        raise WpkError(f"{args.config}: 'routes' must be a list of routes, each with a "
                       f"'subscribe' topic filter")
    known = SETTING_KEYS | set(ROUTE_KEYS)
    check_types({k: v for k, v in settings.items() if k in known}, str(args.config))
    for index, entry in enumerate(file_routes):
        if isinstance(entry, dict):
            check_types(entry, f"{args.config}: routes[{index}]")
    refuse_unknown_keys(settings, known, str(args.config), "setting", "see docs/mqtt.md")
    defaults = {k: settings.pop(k) for k in ROUTE_KEYS if k in settings}
    defaults.update(args.route_defaults)

    def pick(key: str, default=None):
        value = getattr(args, key.replace("-", "_"), None)
        return value if value is not None else settings.get(key, default)

    host, port = parse_address(pick("broker", "127.0.0.1:1883"), "--broker", 1883)
    pipeline = pick("pipeline")
    if not pipeline:
        raise WpkError("--pipeline HOST:PORT is required")
    parse_address(pipeline, "--pipeline")
    client_id = str(pick("client-id", "wpk-bridge"))
    if not client_id.strip():
        raise WpkError("--client-id must not be empty: the broker keeps the bridge's session "
                       "(and what it has not yet acknowledged) under it")
    broker = BrokerConfig(
        host=host, port=port, client_id=client_id,
        username=pick("username"),
        password=pick("password", environment.mqtt_password()),
        tls=bool(pick("tls", False)), tls_ca=pick("tls-ca"), tls_cert=pick("tls-cert"), tls_key=pick("tls-key"),
        tls_insecure=bool(args.tls_insecure or settings.get("tls-insecure", False)))
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(broker, name)
        if path and not Path(path).is_file():
            raise WpkError(f"--{name.replace('_', '-')} {path}: no such file")
    routes = []
    for entry in routes_in:
        if not isinstance(entry, dict) or "subscribe" not in entry:
            raise WpkError("each route needs a 'subscribe' topic filter")
        unknown = set(entry) - set(ROUTE_KEYS) - {"subscribe"}
        if unknown:
            raise WpkError(f"route {entry['subscribe']!r}: unknown key(s) {', '.join(unknown)}")
        routes.append(Route(**{**defaults, **entry}))
    config = BridgeConfig(
        broker=broker, pipeline=pipeline, routes=routes,
        pipeline_stream=bool(pick("stream", False)),
        pipeline_tensor_link=bool(pick("tensor-link", False)),
        pipeline_tls=pick("pipeline-tls"),
        pipeline_identity=pick("pipeline-identity", "bridge"),
        pipeline_server_name=pick("pipeline-server-name"),
        queue_size=int(pick("queue-size", 1000)), queue_policy=pick("queue-policy", "block"),
        max_in_flight=int(pick("max-in-flight", 8)), error_topic=pick("error-topic"),
        result_qos=int(pick("result-qos", 1)))
    config.check()
    return config


async def serve(config: BridgeConfig) -> None:
    """Run a bridge until SIGINT/SIGTERM."""
    from .bridge import Bridge
    from .pipeline import KServePipeline

    bridge = Bridge(config, KServePipeline.from_config(config))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, bridge.stop)
    await bridge.run()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(args)
    for route in config.routes:
        logging.getLogger("wpk.bridge").info(
            "route %s (%s) -> model %s -> %s (%s)", route.subscribe, route.format, route.model,
            route.publish, route.result)
    with one_line_warnings():
        asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
