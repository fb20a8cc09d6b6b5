"""`wpk-emulate PLAN_DIR --link device-edge=10mbit,5ms ...`: run a plan on an emulated network.

Each tier of the plan runs `wpk-serve` in its own network namespace; consecutive tiers are
joined by a veth pair shaped with `tc tbf` (bandwidth, both directions) and a user-space delay
relay (`wpk.deploy.delay_relay`: RTT/2 each way, since this kernel has no netem). A client in
the first tier's namespace (the sensor sits on the device) sends requests through the pipeline.
Tensors travel between tiers over the tensor link (wpk/runtime/tensor_link.py): each receiving tier
serves it on LINK_PORT, and its relay forwards that port as well as the gRPC one, over the same
shaped veth with the same delay, so what is measured is the link the runtime really uses. With
TLS the tiers pass tensors over gRPC, and only the gRPC port is relayed.

What is compared, and why it is honest: the plan's compute times are predictions for the
tiers' hardware (a Raspberry Pi, an edge server, a cloud GPU), while here every tier runs on
this machine's CPU. So the prediction for *this* run takes each tier's compute as measured on
its own (the tier's server answering its tier-local model over loopback, no network), and each
link's time from the partitioner's link model (bytes / bandwidth both ways + RTT) at the
emulated links. The end-to-end request through the shaped pipeline is measured separately, so
the comparison checks the link model, the emulation and the runtime's overheads together.
(`--compute plan` uses the plan's own compute predictions instead: right for plans made from
profiles of this machine, e.g. `wpk-partition --profile-local`.)

Per link, "measured" is derived from the tiers' own request-time counters (Prometheus
/metrics): time in tier i minus its compute minus time in tier i+1.
Everything created (namespaces, veths, processes) is removed on exit, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from wpk.deploy import layout
from wpk.deploy.netns import Topology, remove_stale, require_root
from wpk import cli_args
from wpk.errors import WpkError, cli_entry
from wpk.files import check_outputs, writable_file
from wpk.launch import module_command
from wpk.plan import Plan
from wpk.tiers import parse_link_spec

SERVER_PORT = 8001
RELAY_PORT = 8101
METRICS_PORT = 9090
READY_MARK = "ready on"
START_TIMEOUT_S = 60.0


@dataclass
class EmulatedLink:
    """One link of the plan (between consecutive used tiers) as emulated."""

    src: str
    dst: str
    bandwidth_mbps: float
    rtt_ms: float
    bytes: int
    return_bytes: int
    returns: bool                    # do results travel back over it (RTT/2 both ways)
    via: list[str] = field(default_factory=list)
    # physical hops (bandwidth, RTT) when the link passes unused tiers and they are known
    hops: list[tuple[float, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.src}-{self.dst}"

    def predicted_ms(self) -> float:
        """The partitioner's link model: serialization both ways plus the RTT share, per hop.

        Across unused tiers the partitioner adds each hop's serialization (store and forward);
        the emulation joins the two tiers by one link at the smallest bandwidth (forwarding
        pipelined, as a router does), so such links may measure faster than predicted."""
        hops = self.hops or [(self.bandwidth_mbps, self.rtt_ms)]
        nbytes = self.bytes + self.return_bytes
        return sum(nbytes * 8 / (bandwidth * 1e6) * 1e3 + rtt / 2 * (1 + int(self.returns))
                   for bandwidth, rtt in hops)


def emulated_links(plan: Plan, overrides: Sequence[str] = ()) -> list[EmulatedLink]:
    """The plan's links with `--link SRC-DST=BW,RTT` overrides applied.

    An override names a physical link (device-edge); a plan link that passes through unused
    tiers (`via`) takes the smallest bandwidth and the summed RTT of its hops, as the
    partitioner does, and then needs every hop overridden (or none).
    """
    given: dict[tuple[str, str], tuple[float, float]] = {}
    for text in overrides:
        src, dst, bandwidth, rtt = parse_link_spec(text)
        given[(src, dst)] = (bandwidth, rtt)
    deliver = plan.objective.deliver_to or plan.tiers[0].name
    deliver_index = plan.tier_index(deliver) if deliver in [t.name for t in plan.tiers] else 0
    links, used = [], set()
    for index, link in enumerate(plan.links):
        chain = [link.src, *link.via, link.dst]
        hops = list(zip(chain, chain[1:]))
        found = [given.get(h) for h in hops]
        if (link.src, link.dst) in given and len(hops) > 1:
            found = [given[(link.src, link.dst)]]
            used.add((link.src, link.dst))
        if all(f is None for f in found):
            bandwidth, rtt = link.bandwidth_mbps, link.rtt_ms
            found = []  # per-hop values are not in the plan: one hop at min bandwidth, sum RTT
        elif any(f is None for f in found):
            missing = [f"{a}-{b}" for (a, b), f in zip(hops, found) if f is None]
            raise WpkError(f"link {link.src}-{link.dst} passes through {', '.join(link.via)}: "
                           f"give --link for {', '.join(missing)} too")
        else:
            bandwidth = min(f[0] for f in found)
            rtt = sum(f[1] for f in found)
        used.update(h for h, f in zip(hops, found) if f is not None)
        links.append(EmulatedLink(link.src, link.dst, bandwidth, rtt, link.bytes,
                                  link.return_bytes, deliver_index <= index, list(link.via),
                                  [tuple(f) for f in found] if len(found) > 1 else []))
    unknown = set(given) - used
    if unknown:
        known = [f"{a}-{b}" for link in plan.links
                 for a, b in zip([link.src, *link.via], [*link.via, link.dst])]
        raise WpkError(f"--link {'-'.join(sorted(unknown)[0])}: the plan has no such link "
                       f"(its links: {', '.join(known) or 'none, it uses one tier'})")
    return links


def _mean(before: dict, after: dict, model: str) -> float | None:
    count = after["count"].get(model, 0) - before["count"].get(model, 0)
    if count <= 0:
        return None
    return (after["sum_s"].get(model, 0.0) - before["sum_s"].get(model, 0.0)) / count * 1e3


@dataclass
class StageResult:
    stage: str
    kind: str                       # "compute" | "link"
    plan_ms: float | None           # what the plan predicts (its tier hardware / its links)
    predicted_ms: float | None      # for this run
    measured_ms: float | None
    note: str = ""


@dataclass
class EmulationResult:
    stages: list[StageResult]
    measured_ms: float              # end to end, median over requests
    predicted_ms: float
    plan_predicted_ms: float        # plan.json's own prediction (its hardware and links)
    requests_ms: list[float]

    def to_json(self) -> dict:
        return {"end_to_end": {"measured_ms": self.measured_ms, "predicted_ms": self.predicted_ms,
                               "plan_predicted_ms": self.plan_predicted_ms,
                               "requests_ms": self.requests_ms},
                "stages": [s.__dict__ for s in self.stages]}


class Emulation:
    """Namespaces, shaped links, delay relays and one tier server per namespace.

    with Emulation(plan_dir, links) as emulation:
        result = emulation.measure(requests=10)
    """

    def __init__(self, plan_dir: str | Path, links: Sequence[EmulatedLink] | None = None, *,
                 threads: int = 1, tls_dir: str | Path | None = None,
                 cpu: dict[str, float] | None = None,
                 log_dir: str | Path | None = None, python: str = sys.executable):
        self.plan, self.plan_dir = layout.load(plan_dir)
        self.links = list(links) if links is not None else emulated_links(self.plan)
        if len(self.links) != len(self.plan.tiers) - 1:
            raise WpkError("need one emulated link per pair of consecutive plan tiers")
        self.names = [t.name for t in self.plan.tiers]
        self.threads = threads
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.python = python
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="wpk-emulate-"))
        self.topology = Topology(self.names, [l.bandwidth_mbps for l in self.links])
        self.cpu = dict(cpu or {})
        for tier in self.cpu:
            self.plan.tier(tier)
        self._limits: list = []

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> "Emulation":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        require_root()
        remove_stale()
        try:
            self.topology.create()
            if self.tls_dir is not None:
                self._prepare_tls()
            # last tier first, so each tier's next hop is listening when it starts
            for index in reversed(range(len(self.names))):
                tier = self.names[index]
                next_address = None
                if index + 1 < len(self.names):
                    next_address = f"{self.topology.links[index].dst_addr}:{RELAY_PORT}"
                self._start_server(tier, next_address)
                if index > 0:
                    self._start_relay(index - 1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.topology.close()
        for limit in self._limits:
            limit.close()
        self._limits.clear()
        if self._own_logs:
            for path in self.log_dir.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.log_dir.rmdir()

    def _prepare_tls(self) -> None:
        from wpk.deploy import bundle, tls

        hosts = bundle.tls_hosts(self.plan)
        for link in self.topology.links:
            hosts[link.src_tier].append(link.src_addr)
            hosts[link.dst_tier].append(link.dst_addr)
        if not tls.has_credentials(self.tls_dir, self.names):
            tls.generate(self.tls_dir, self.names, hosts)

    def set_bandwidth(self, link_index: int, bandwidth_mbps: float) -> None:
        """Reshape one link in place (the servers keep running)."""
        self.topology.set_bandwidth(link_index, bandwidth_mbps)
        link = self.links[link_index]
        link.bandwidth_mbps = bandwidth_mbps
        if link.hops:  # every hop at the new rate, each keeping its RTT
            link.hops = [(bandwidth_mbps, rtt) for _, rtt in link.hops]

    def _spawn(self, tier: str, label: str, argv: list[str], ready: str
               ) -> subprocess.Popen:
        """Start argv in tier's namespace; wait for a stdout line containing `ready`."""
        log = open(self.log_dir / f"{label}.log", "w")
        process = self.topology.popen(tier, argv, stdout=subprocess.PIPE, stderr=log,
                                      text=True, bufsize=1)
        log.close()
        line = _read_line_with(process, ready, START_TIMEOUT_S)
        if line is None:
            err = (self.log_dir / f"{label}.log").read_text().strip().splitlines()
            reason = err[-1] if err else f"exit code {process.poll()}"
            raise WpkError(f"{label} in namespace {self.topology.namespaces[tier]} did not "
                           f"start: {reason}")
        threading.Thread(target=_drain, args=(process,), daemon=True).start()
        return process

    def _link_port(self, tier: str) -> int | None:
        """The tensor-link port `tier` serves (None: TLS, gRPC only)."""
        return layout.link_port(self.plan, tier, self.tls_dir is not None)

    def _start_server(self, tier: str, next_address: str | None) -> None:
        argv = module_command("wpk.runtime.server", str(self.plan_dir), "--tier", tier,
                              "--host", "127.0.0.1", "--port", str(SERVER_PORT),
                              "--metrics-port", str(METRICS_PORT),
                              "--threads", str(self.threads), python=self.python)
        if next_address:
            argv += ["--next", next_address]
        link_port = self._link_port(tier)
        if link_port is not None:  # the relay listens on the same port number: advertised
            argv += ["--link-port", str(link_port)]
        if self.tls_dir is not None:
            argv += ["--tls-dir", str(self.tls_dir)]
        if tier in self.cpu:  # limited below one core after it starts (too late for auto)
            argv += ["--run", "inline"]
        process = self._spawn(tier, f"wpk-serve-{tier}", argv, READY_MARK)
        if tier in self.cpu:
            from wpk.deploy.cpulimit import CpuLimit

            limit = CpuLimit(self.topology.namespaces[tier], self.cpu[tier])
            self._limits.append(limit)
            limit.add(process.pid)

    def _start_relay(self, link_index: int) -> None:
        link, veth = self.links[link_index], self.topology.links[link_index]
        argv = module_command("wpk.deploy.delay_relay",
                              "--listen", f"{veth.dst_addr}:{RELAY_PORT}",
                              "--to", f"127.0.0.1:{SERVER_PORT}",
                              "--delay-ms", str(link.rtt_ms / 2), python=self.python)
        link_port = self._link_port(veth.dst_tier)
        if link_port is not None:
            # The upstream dials the host of its --next (this relay) on the advertised port.
            argv += ["--listen", f"{veth.dst_addr}:{link_port}",
                     "--to", f"127.0.0.1:{link_port}"]
        self._spawn(veth.dst_tier, f"relay-{link.name}", argv, "ready")

    def transports(self) -> list[str]:
        """Per link, what carried the tensors: "tensor link" (an open connection from the
        sending tier to the next tier's relayed link port) or "gRPC" (TLS, or the runtime
        fell back: see that tier's log)."""
        found = []
        for veth in self.topology.links:
            link_port = self._link_port(veth.dst_tier)
            used = link_port is not None and self.topology.established(
                veth.src_tier, veth.dst_addr, link_port) > 0
            found.append("tensor link" if used else "gRPC")
        return found

    # -- measuring ----------------------------------------------------------------------
    def _client(self, tier: str, args: list[str], timeout: float) -> dict:
        argv = module_command("wpk.deploy.emulate_client", *args, python=self.python)
        result = self.topology.run_in(tier, argv, capture_output=True, text=True,
                                      timeout=timeout)
        if result.returncode != 0:
            raise WpkError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                           else f"client in {tier} failed ({result.returncode})")
        return json.loads(result.stdout)

    def _scrape(self) -> dict[str, dict]:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        return {t: self._client(t, ["scrape", "--url", url], 30) for t in self.names}

    def _infer(self, tier: str, model: str, requests: int, warmup: int) -> list[float]:
        args = ["infer", "--target", f"127.0.0.1:{SERVER_PORT}", "--plan", str(self.plan_dir),
                "--model", model, "--requests", str(requests), "--warmup", str(warmup)]
        if self.tls_dir is not None:
            args += ["--tls-dir", str(self.tls_dir), "--as", tier, "--peer", tier]
        return self._client(tier, args, 600)["ms"]

    def measure(self, requests: int = 10, warmup: int = 2, compute_requests: int | None = None,
                compute_from: str = "measured") -> EmulationResult:
        """Time `requests` through the pipeline, and each tier's compute on its own."""
        name = self.plan.name
        before = self._scrape()
        e2e = self._infer(self.names[0], name, requests, warmup)
        after = self._scrape()
        in_tier = {}
        for i, tier in enumerate(self.names):
            model = name if i == 0 else f"{name}.{tier}"
            in_tier[tier] = _mean(before[tier], after[tier], model)
        compute = {}
        for tier in self.plan.tiers:
            if not tier.slice and not tier.optimized:
                compute[tier.name] = 0.0
                continue
            model = f"{name}.{tier.name}"
            before_c = self._scrape()[tier.name]
            self._infer(tier.name, model, compute_requests or max(3, requests // 2), 1)
            compute[tier.name] = _mean(before_c, self._scrape()[tier.name], model) or 0.0

        transports = self.transports()
        stages: list[StageResult] = []
        predicted_total = 0.0
        for i, tier in enumerate(self.plan.tiers):
            own = compute[tier.name] if compute_from == "measured" else tier.predicted_compute_ms
            predicted_total += own
            stages.append(StageResult(
                f"{tier.name} compute", "compute", tier.predicted_compute_ms, own,
                compute[tier.name],
                f"plan: {tier.hardware.get('hardware', 'its hardware')}; here: tier alone"))
            if i < len(self.links):
                link = self.links[i]
                predicted = link.predicted_ms()
                predicted_total += predicted
                measured = None
                here, nxt = in_tier[tier.name], in_tier[self.names[i + 1]]
                if here is not None and nxt is not None:
                    measured = here - compute[tier.name] - nxt
                stages.append(StageResult(
                    f"{link.src}->{link.dst} link", "link", self.plan.links[i].predicted_transfer_ms,
                    predicted, measured,
                    f"{_rate(link.bandwidth_mbps)}, {link.rtt_ms:g} ms; "
                    f"{_size(link.bytes)} + {_size(link.return_bytes)} back; "
                    f"over {transports[i]}"))
        return EmulationResult(stages, statistics.median(e2e), predicted_total,
                               float(self.plan.predicted.get("latency_ms", 0.0)), e2e)


def _rate(mbps: float) -> str:
    return f"{mbps / 1000:g} Gbit/s" if mbps >= 1000 else (
        f"{mbps:g} Mbit/s" if mbps >= 1 else f"{mbps * 1000:g} kbit/s")


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _read_line_with(process: subprocess.Popen, mark: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = process.stdout.readline()
            if not line:
                return None
            if mark in line:
                return line.strip()
    return None


def _drain(process: subprocess.Popen) -> None:
    with contextlib.suppress(Exception):
        for _ in process.stdout:
            pass


# -- CLI ----------------------------------------------------------------------------------
def render(result: EmulationResult, links: Sequence[EmulatedLink]) -> None:
    from wpk.console import make_console
    from rich.table import Table

    table = Table(title="measured vs predicted, ms (plan: plan.json as written, for its tier "
                        "hardware and links; predicted here: this run)")
    for column in ("stage", "plan", "predicted here", "measured", ""):
        table.add_column(column, justify="left" if column in ("stage", "") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for s in result.stages:
        table.add_row(s.stage, fmt(s.plan_ms), fmt(s.predicted_ms), fmt(s.measured_ms), s.note)
    table.add_row("end-to-end", fmt(result.plan_predicted_ms), fmt(result.predicted_ms),
                  fmt(result.measured_ms),
                  f"median of {len(result.requests_ms)} requests")
    make_console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-emulate",
        description="Run a plan with every tier in its own network namespace, links shaped to "
                    "the given bandwidth and RTT, and compare measured with predicted latency. "
                    "Needs root.")
    parser.add_argument("plan_dir", metavar="PLAN_DIR")
    parser.add_argument("--link", action="append", default=[], metavar="SRC-DST=BW,RTT",
                        help="emulate a link, e.g. device-edge=10mbit,5ms (repeatable; default: "
                             "the plan's links)")
    parser.add_argument("--requests", type=int, default=10, help="timed requests (default 10)")
    parser.add_argument("--warmup", type=cli_args.non_negative_int, default=2)
    parser.add_argument("--threads", type=cli_args.threads, default=1,
                        help="ONNX Runtime threads per tier (default 1)")
    parser.add_argument("--cpu", action="append", default=[], metavar="TIER=FRACTION",
                        help="limit a tier to a fraction of one CPU (cgroup quota), e.g. "
                             "device=0.25 for a device 4x slower than this machine's core")
    parser.add_argument("--compute", choices=("measured", "plan"), default="measured",
                        help="compute part of the prediction: each tier measured alone on this "
                             "machine (default), or the plan's numbers")
    parser.add_argument("--tls", metavar="DIR", nargs="?", const="",
                        help="mutual TLS between tiers with the certificates in DIR (generated "
                             "there if missing; without DIR: a temporary CA)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier --json file")
    return parser


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so the same cleanup runs as on Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_root()
    if args.requests < 1:
        raise WpkError("--requests must be at least 1")
    plan, _ = layout.load(args.plan_dir)
    if args.json:   # before minutes of emulation: never over the plan or an earlier result
        writable_file(args.json, "JSON")
        check_outputs([args.json], [Path(args.plan_dir) / "plan.json"], force=args.force)
    if len(plan.tiers) < 2:
        raise WpkError(f"{args.plan_dir}: the plan runs on one tier ({plan.tiers[0].name}): "
                       "there is no link to emulate")
    links = emulated_links(plan, args.link)
    cpu = {}
    for item in args.cpu:
        tier, sep, value = item.partition("=")
        try:
            cpu[tier] = float(value)
        except ValueError:
            raise WpkError(f"--cpu {item!r}: expected TIER=FRACTION like device=0.25") from None
        if not sep or cpu[tier] <= 0:
            raise WpkError(f"--cpu {item!r}: expected TIER=FRACTION like device=0.25")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        tls_dir = None
        if args.tls is not None:
            tls_dir = args.tls or stack.enter_context(tempfile.TemporaryDirectory(
                prefix="wpk-tls-"))
        print(f"emulating {' -> '.join(t.name for t in plan.tiers)}: " + ", ".join(
            f"{l.name} {_rate(l.bandwidth_mbps)} {l.rtt_ms:g} ms" for l in links)
            + (" (mutual TLS)" if tls_dir else ""), flush=True)
        emulation = stack.enter_context(Emulation(args.plan_dir, links, threads=args.threads,
                                                  tls_dir=tls_dir, cpu=cpu))
        result = emulation.measure(args.requests, args.warmup, compute_from=args.compute)
    render(result, links)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"end-to-end: measured {result.measured_ms:.1f} ms, "
          f"predicted {result.predicted_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
