"""`wpk-deploy PLAN_DIR --local | --bundle OUT | --k8s OUT`: deploy a plan's tiers.

One target flag picks how (emulation on a shaped network is `wpk-emulate`, which needs
root). Each target is a function `(args) -> int` in TARGETS; options that only one target
reads go in that target's argument group.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from typing import Callable

from wpk import cli_args
from wpk.errors import WpkError, cli_entry, one_line_warnings
from wpk.files import existing_file
from wpk.runtime.batching import add_batching_arguments


def run_local(args: argparse.Namespace) -> int:
    from wpk.console import make_console
    from rich.table import Table

    from wpk.deploy.local import LocalDeployment
    from wpk.runtime.cpu_latency import cpu_latency_limit
    from wpk.plan import load_plan
    from wpk.runtime.cpus import format_cpu_list, split_for_plan

    console = make_console()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    plan = load_plan(args.plan_dir)
    cpus = split_for_plan(plan) if args.pin_cpus else None
    tier_args = plan_batching_arguments(args, plan)
    deployment = LocalDeployment(args.plan_dir, port=args.port, host=args.host, name=args.name,
                                 threads=args.threads, metrics=not args.no_metrics,
                                 link=args.link, cpus=cpus, serve_args=batching_arguments(args),
                                 tier_args=tier_args)
    batches = {t.name: t.batch if tier_args else (args.max_batch or 1) for t in plan.tiers}
    # one request covers every tier: they all run on this machine
    with cpu_latency_limit(args.cpu_latency_us), deployment:
        table = Table(title=f"{deployment.plan.name}: {len(deployment.tiers)} tiers")
        for column in ("tier", "address", "models", "tensor link", "metrics", "pid", "cpus",
                       "batch"):
            table.add_column(column, overflow="fold")
        for index, handle in enumerate(deployment.tiers):
            table.add_row(handle.tier, handle.address, ", ".join(handle.models),
                          handle.link_address or "-", handle.metrics_url or "-",
                          str(handle.process.pid),
                          format_cpu_list(cpus[index]) if cpus else "any",
                          str(batches[handle.tier]))
        console.print(table)
        console.print(f"entry: {deployment.entry} (model {deployment.tiers[0].models[0]!r}); "
                      f"Ctrl-C stops all tiers")
        bridge = None
        if args.mqtt:  # the MQTT bridge (wpk.bridge) feeds the entry tier
            from wpk.bridge.deploy_hook import start_bridge
            bridge = start_bridge(args.mqtt, deployment.entry, deployment.tiers[0].models[0],
                                  args.bridge_config)
            console.print(f"MQTT bridge: broker {args.mqtt} (pid {bridge.pid})")
        sys.stdout.flush()
        try:
            return _wait_local(deployment, bridge, stop, console)
        finally:
            if bridge is not None and bridge.poll() is None:
                bridge.terminate()
                bridge.wait(10)


def _wait_local(deployment, bridge, stop, console) -> int:
    """Until Ctrl-C (0), or until the bridge exits (1). A tier that exits is restarted with
    a growing delay while the others keep serving (see LocalDeployment.revive)."""
    from rich.markup import escape

    def report(line: str) -> None:
        console.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True)

    while not stop.wait(0.2):
        if bridge is not None and bridge.poll() is not None:
            console.print(f"[red]MQTT bridge exited with code {bridge.returncode}; "
                          "stopping the tiers[/red]")
            return 1
        deployment.revive(report)
        sys.stdout.flush()
    console.print("stopping all tiers")
    return 0


def _tls_dir(args: argparse.Namespace, out: str) -> str | None:
    """--tls DIR: certificates there (generated if missing); bare --tls: OUT/pki."""
    if args.tls is None:
        return None
    from pathlib import Path

    return args.tls or str(Path(out) / "pki")


def run_bundle(args: argparse.Namespace) -> int:
    from wpk.deploy.bundle import write_bundle

    tls_dir = _tls_dir(args, args.bundle)
    dirs = write_bundle(args.plan_dir, args.bundle, tls_dir=tls_dir, registry=args.registry)
    for directory in dirs:
        print(f"{directory}/  (start.sh, {directory.name} systemd unit, install.sh, Dockerfile)")
    if tls_dir:
        print(f"certificates: {tls_dir} (keep ca.key off the tiers)")
    return 0


def run_k8s(args: argparse.Namespace) -> int:
    from wpk.deploy.k8s import write_manifests

    tls_dir = _tls_dir(args, args.k8s)
    files = write_manifests(args.plan_dir, args.k8s, registry=args.registry, tag=args.tag,
                            namespace=args.namespace, tls_dir=tls_dir)
    for path in files:
        print(path)
    print(f"apply with: kubectl apply -k {args.k8s}  (images: wpk-deploy --bundle, then docker "
          "build each tier's directory)")
    return 0


TARGETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "local": run_local, "bundle": run_bundle, "k8s": run_k8s}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wpk-deploy", description="Deploy a plan's tiers.")
    parser.add_argument("plan_dir", metavar="PLAN_DIR", help="directory written by wpk-partition")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--local", action="store_true",
                        help="run every tier on this machine as separate processes")
    target.add_argument("--bundle", metavar="OUT",
                        help="write one self-contained directory per tier (slice, config, "
                             "start script, systemd unit, Dockerfile)")
    target.add_argument("--k8s", metavar="OUT",
                        help="write Kubernetes manifests (Deployment + Service per tier, "
                             "ConfigMap with the plan, kustomization.yaml)")
    parser.add_argument("--name", help="model name to serve (default: the plan's; --local)")
    local = parser.add_argument_group("--local")
    local.add_argument("--port", type=cli_args.port, default=8001,
                       help="entry tier's gRPC port (default 8001); others take free ports")
    local.add_argument("--host", default="127.0.0.1", help="address every tier binds")
    local.add_argument("--threads", type=cli_args.threads, default=0,
                       help="ONNX Runtime threads per tier (0: ORT's default)")
    local.add_argument("--link", choices=("tcp", "grpc"), default="tcp",
                       help="how the tiers pass tensors: tcp, the tensor link (the default and "
                       "the only choice: grpc, gRPC streams, was removed and means tcp, with "
                       "a warning)")
    local.add_argument("--pin-cpus", action="store_true",
                       help="give every tier CPUs of its own (wpk-serve --cpus): whole "
                       "physical cores where there are enough, about in proportion to its "
                       "predicted compute")
    local.add_argument("--cpu-latency-us", type=cli_args.non_negative_int, metavar="US",
                       help="while the tiers run, keep idle CPUs able to wake within US "
                       "microseconds (see wpk-serve --cpu-latency-us; needs root)")
    add_batching_arguments(local, "every tier batches up to N requests that arrive together "
                           "(see wpk-serve --max-batch; a tier whose slice takes no batch "
                           "dimension refuses to start, naming it); 1: none. Default: as the "
                           "plan says (wpk-partition --max-batch)")
    parser.set_defaults(max_batch=None)     # None: the plan's batch per tier
    local.add_argument("--no-metrics", action="store_true",
                       help="do not serve Prometheus /metrics")
    local.add_argument("--mqtt", metavar="HOST:PORT", type=cli_args.host_port,
                       help="also run wpk-bridge against this MQTT broker (docs/mqtt.md)")
    local.add_argument("--bridge-config", metavar="YAML",
                       help="wpk-bridge routes (default: JSON on wpk/<model>/+/input)")
    shipped = parser.add_argument_group("--bundle / --k8s")
    shipped.add_argument("--tls", metavar="DIR", nargs="?", const="",
                         help="mutual TLS between tiers with the CA and tier certificates in "
                              "DIR (generated there if missing; bare --tls: OUT/pki)")
    shipped.add_argument("--registry", help="image registry prefix, e.g. registry.local/wpk")
    shipped.add_argument("--tag", default="latest", help="image tag (default latest)")
    shipped.add_argument("--namespace", help="Kubernetes namespace of every object")
    return parser


LOCAL_ONLY = ("port", "host", "threads", "link", "no_metrics", "mqtt", "bridge_config", "name",
              "cpu_latency_us", "pin_cpus")
SHIPPED_ONLY = ("tls", "registry", "tag", "namespace")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
REGISTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options of another target are refused, not ignored; shipped names are valid for the
    tools that will read them (kubectl, docker), so the manifests are not refused later."""
    given = {name for name in (*LOCAL_ONLY, *SHIPPED_ONLY)
             if getattr(args, name) != parser.get_default(name)}
    wrong = sorted(given & set(SHIPPED_ONLY if args.local else LOCAL_ONLY))
    if wrong:
        target = "--local" if not args.local else "--bundle / --k8s"
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        raise WpkError(f"{flags}: only for {target}")
    if args.bridge_config and not args.mqtt:
        raise WpkError("--bridge-config needs --mqtt HOST:PORT (the broker the bridge uses)")
    if args.bridge_config:   # read by the bridge once the tiers run: checked now
        from wpk.plan import load_plan
        from wpk.bridge.deploy_hook import check_bridge

        existing_file(args.bridge_config, "bridge config")
        check_bridge(args.mqtt, args.name or load_plan(args.plan_dir).name, args.bridge_config)
    if args.namespace is not None and not DNS_LABEL.fullmatch(args.namespace):
        raise WpkError(f"--namespace {args.namespace!r}: a Kubernetes namespace is lower-case "
                       f"letters, digits and '-', at most 63")
    if not IMAGE_TAG.fullmatch(args.tag):
        raise WpkError(f"--tag {args.tag!r}: an image tag is letters, digits, '_', '.' and '-'"
                       f" (at most 128, not starting with '.' or '-')")
    if args.registry is not None and not REGISTRY.fullmatch(args.registry):
        raise WpkError(f"--registry {args.registry!r}: expected a registry prefix like "
                       f"registry.local:5000/wpk")


def batching_arguments(args: argparse.Namespace) -> list[str]:
    """What every tier's wpk-serve gets for --max-batch (nothing without batching, or when
    the plan decides: see plan_batching_arguments)."""
    if args.max_batch is None or args.max_batch <= 1:
        return []
    return ["--max-batch", str(args.max_batch),
            "--max-queue-delay-us", str(args.max_queue_delay_us)]


def plan_batching_arguments(args: argparse.Namespace, plan) -> dict[str, list[str]]:
    """Without --max-batch: each tier the plan batches (wpk-partition --max-batch) gets
    wpk-serve --max-batch with its batch; the others nothing."""
    if args.max_batch is not None:
        return {}
    return {tier.name: ["--max-batch", str(tier.batch),
                        "--max-queue-delay-us", str(args.max_queue_delay_us)]
            for tier in plan.tiers if tier.batch > 1}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    for name, run in TARGETS.items():
        if getattr(args, name, False):
            with one_line_warnings():
                return run(args)
    raise AssertionError("argparse requires one target")


if __name__ == "__main__":
    sys.exit(main())
