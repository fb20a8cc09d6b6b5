"""Serving peers: one model behind ONNX Runtime alone (in-process), wpk as one tier
(`wpk-serve`), wpk as three local tiers (`wpk-deploy --local`), NVIDIA Triton through PyTriton
(ONNX Runtime inside the bound Python callable) and MLServer (ONNX Runtime in a small runtime
class, benchmarks/mlserver_onnx.py), every server asked by the same tritonclient gRPC client,
ONNX Runtime at 1 intra-op thread (and 1 inter-op thread) everywhere.

    pip install -e ".[test]" -r benchmarks/serving-peers.txt   # a venv of their own
    python benchmarks/serving_peers.py [--models mlp,resnet_like,resnet18] [--seconds 1]
        [--rounds 5] [--contenders ort,wpk,wpk-3,pytriton,mlserver] [--markdown FILE]

Per model every server starts on 127.0.0.1 (free ports) and answers one request, checked
against ONNX Runtime's own answer; then the contenders are measured in rounds, each round
visiting every contender (in an order rotated round by round, so that load from elsewhere
falls on all alike): latency with 1 request in flight (`tritonclient.grpc`, blocking calls
back to back) for `--seconds`, then requests/s with 8 in flight (`tritonclient.grpc.aio`,
8 coroutines) for `--seconds`. ONNX Runtime alone runs the same session back to back, and
from 8 threads for its 8 in flight. Each figure is the median of the per-round values with
their range; the overheads are per-round differences (p50 - ORT's p50) and ratios (req/s /
ORT's req/s), then their median.

Servers keep their defaults otherwise: wpk-serve one slice at a time (`--workers 1`),
Triton one model instance, MLServer `parallel_workers 0` (the model on the server's event
loop, no worker process in between). A peer that is not installed, or that fails to start
or answers differently, is one line and no row. `resnet18` (torchvision, random weights)
needs torch and torchvision; a path to an .onnx file is taken as a model too.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.runtime_overhead import (make_plan_dir, pipeline_rate,  # noqa: E402
                                         random_feeds, sample, session)
from wpk.bridge.broker import free_port  # noqa: E402
from wpk.console import make_console  # noqa: E402
from wpk.deploy.local import LocalDeployment  # noqa: E402
from wpk.errors import WpkError  # noqa: E402
from wpk.examples import EXAMPLES  # noqa: E402

console = make_console()
ROOT = Path(__file__).resolve().parents[1]
THREADS = 1            # ONNX Runtime intra-op threads in every contender
IN_FLIGHT = 8          # requests outstanding for the throughput figure
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 30.0
CONTENDERS = ("ort", "wpk", "wpk-3", "pytriton", "mlserver")
LABELS = {"ort": "ORT alone (in-process)", "wpk": "wpk, 1 tier (wpk-serve)",
          "wpk-3": "wpk, 3 tiers (wpk-deploy --local)", "pytriton": "Triton (PyTriton)",
          "mlserver": "MLServer"}
PEER_MODULES = {"pytriton": "pytriton", "mlserver": "mlserver"}


class Unavailable(Exception):
    """A contender that cannot run here (not installed, failed to start, wrong answers):
    reported in one line, and left out of the table."""


@dataclass
class Workload:
    name: str
    path: Path               # the model, saved where every server reads it
    work: Path               # scratch space for plans and server settings
    feeds: dict[str, np.ndarray]
    expected: list[np.ndarray]   # ONNX Runtime's own answer to `feeds`


@dataclass
class Contender:
    key: str
    latency: Callable[[float], list[float]]   # seconds -> one latency per request
    rate: Callable[[float], float]            # seconds -> requests/s at IN_FLIGHT


@dataclass
class Rounds:
    """Per-round figures of one contender: p50 and p99 latency (s) and requests/s."""
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)


# --- models ---------------------------------------------------------------------------------

def load_model(name: str, directory: Path) -> onnx.ModelProto:
    """A built-in example, `resnet18` (exported from torchvision, random weights) or an .onnx
    file; Unavailable where torch is missing."""
    if name in EXAMPLES:
        return EXAMPLES[name]()
    if name.endswith(".onnx"):
        if not Path(name).is_file():
            raise Unavailable(f"no such file {name}")
        return onnx.load(name)
    from benchmarks.zoo_corpus import MissingModel
    from benchmarks.optimizer_models import VISION, export

    if name not in VISION:
        raise Unavailable(f"unknown model {name!r} (examples: {', '.join(EXAMPLES)}; "
                          f"torchvision: {', '.join(VISION)}; or a path to an .onnx file)")
    try:
        return export(name, directory)
    except MissingModel as missing:
        raise Unavailable(str(missing)) from None


def workload(name: str, root: Path) -> Workload:
    short = Path(name).stem if name.endswith(".onnx") else name
    work = root / short
    work.mkdir(parents=True)
    model = load_model(name, work)
    path = work / f"{short}.onnx"
    onnx.save(model, str(path))
    alone = session(path, THREADS)
    feeds = random_feeds(alone)
    return Workload(short, path, work, feeds, alone.run(None, feeds))


# --- servers --------------------------------------------------------------------------------

def wait_ready(address: str, model: str, process: subprocess.Popen | None,
               timeout: float = START_TIMEOUT_S) -> None:
    """Until the server at `address` says `model` is ready; Unavailable if its process exits
    first or the time runs out."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise Unavailable(f"exited with code {process.returncode} before it was ready")
            with contextlib.suppress(Exception):
                if client.is_model_ready(model, client_timeout=2):
                    return
            time.sleep(0.3)
    finally:
        client.close()
    raise Unavailable(f"not ready within {timeout:.0f} s")


def stop_process(process: subprocess.Popen, first: signal.Signals) -> None:
    """`first` to the server, then SIGKILL to its whole process group (Triton's server and
    stubs are its children) if it is still there after STOP_TIMEOUT_S."""
    if process.poll() is None:
        process.send_signal(first)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):   # children left behind by a clean exit
        os.killpg(process.pid, signal.SIGKILL)


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


@contextlib.contextmanager
def server_process(command: list[str], log: Path, address: str, model: str,
                   stop: signal.Signals, env: dict[str, str] | None = None) -> Iterator[str]:
    """A server in a process group of its own, its output in `log`; yields `address` once
    `model` is ready there, and stops it on the way out."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    try:
        try:
            wait_ready(address, model, process)
        except Unavailable as error:
            raise Unavailable(f"{error}; its last line: {last_line(log)}") from None
        yield address
    finally:
        stop_process(process, stop)


def start_wpk(plan_dir: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    deployment = LocalDeployment(plan_dir, port=free_port(), threads=THREADS, metrics=False,
                                 start_timeout=START_TIMEOUT_S)
    try:
        stack.enter_context(deployment)
    except WpkError as error:
        raise Unavailable(str(error)) from None
    return deployment.entry, deployment.plan.name


def start_wpk_single(w: Workload, stack: contextlib.ExitStack) -> tuple[str, str]:
    """The whole model as a one-tier plan, served by one wpk-serve."""
    from wpk.partitioner.api import partition

    plan_dir = w.work / "one_tier"
    try:
        partition(w.path, tiers=["device"], out_dir=plan_dir, use_calibration=False)
    except WpkError as error:
        raise Unavailable(f"wpk-partition: {error}") from None
    return start_wpk(plan_dir, stack)


def start_wpk_three(w: Workload, stack: contextlib.ExitStack) -> tuple[str, str]:
    """device -> edge -> cloud on this machine, cut where the FLOPs split in thirds (the plan
    benchmarks/runtime_overhead.py measures)."""
    try:
        plan_dir = make_plan_dir(w.name, w.work, model=onnx.load(str(w.path)))
    except WpkError as error:
        raise Unavailable(f"wpk-partition: {error}") from None
    return start_wpk(plan_dir, stack)


def python_library_env() -> dict[str, str]:
    """Triton's Python stub links libpython dynamically: point it at this interpreter's, or
    it may load the system's, whose version differs from the standard library it then runs
    (seen here: pyenv 3.11.7 beside Debian's libpython 3.11.2)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if not list(Path(libdir).glob("libpython3*.so*")):
        return {}
    return {"LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}


def start_pytriton(w: Workload, stack: contextlib.ExitStack) -> tuple[str, str]:
    grpc_port, http_port = free_port(), free_port()
    command = [sys.executable, __file__, "--pytriton-serve", str(w.path), "--name", w.name,
               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--workspace", str(w.work / "pytriton")]
    address = stack.enter_context(server_process(
        command, w.work / "pytriton.log", f"127.0.0.1:{grpc_port}", w.name, signal.SIGINT,
        python_library_env()))
    return address, w.name


def serve_pytriton(model_path: Path, name: str, grpc_port: int, http_port: int,
                   workspace: Path) -> None:
    """Runs in the server process: ONNX Runtime bound to Triton as a Python callable. Its
    workspace (sockets, model store) lies in the benchmark's scratch space, removed even
    when a stop runs out of time."""
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    sess = session(model_path, THREADS)
    outputs = [o.name for o in sess.get_outputs()]

    def infer(requests):
        return [dict(zip(outputs, sess.run(outputs, dict(r.items())))) for r in requests]

    def spec(arg) -> Tensor:
        dtype = np.float32 if arg.type == "tensor(float)" else np.int64
        return Tensor(name=arg.name, dtype=dtype, shape=(-1,) * len(arg.shape))

    # Triton waits exit_timeout_secs (default 30) for open connections when it stops
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=grpc_port,
                          http_address="127.0.0.1", http_port=http_port, allow_metrics=False,
                          exit_timeout_secs=int(STOP_TIMEOUT_S / 4))
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(model_name=name, infer_func=infer,
                    inputs=[spec(i) for i in sess.get_inputs()],
                    outputs=[spec(o) for o in sess.get_outputs()],
                    config=ModelConfig(batching=False))
        triton.serve()


def start_mlserver(w: Workload, stack: contextlib.ExitStack) -> tuple[str, str]:
    """MLServer over a repository of one model (benchmarks/mlserver_onnx.py's runtime)."""
    repository = w.work / "mlserver"
    (repository / w.name).mkdir(parents=True)
    grpc_port = free_port()
    settings = {"host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port,
                "metrics_endpoint": None, "parallel_workers": 0, "debug": False,
                "model_repository_root": str(repository)}
    model = {"name": w.name, "implementation": "benchmarks.mlserver_onnx.OnnxRuntimeModel",
             "parameters": {"uri": str(w.path)}}
    (repository / "settings.json").write_text(json.dumps(settings))
    (repository / w.name / "model-settings.json").write_text(json.dumps(model))
    command = [sys.executable, "-m", "mlserver.cli.main", "start", str(repository)]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    address = stack.enter_context(server_process(
        command, w.work / "mlserver.log", f"127.0.0.1:{grpc_port}", w.name, signal.SIGTERM,
        env))
    return address, w.name


SERVERS: dict[str, Callable[[Workload, contextlib.ExitStack], tuple[str, str]]] = {
    "wpk": start_wpk_single, "wpk-3": start_wpk_three, "pytriton": start_pytriton,
    "mlserver": start_mlserver}


# --- clients --------------------------------------------------------------------------------

def triton_inputs(feeds: dict[str, np.ndarray]) -> list:
    import tritonclient.grpc as triton
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonAio:
    """tritonclient.grpc.aio behind the `infer(model, feeds)` call that runtime_overhead's
    pipeline_rate makes (the inputs are encoded once)."""

    def __init__(self, address: str, feeds: dict[str, np.ndarray]):
        import tritonclient.grpc.aio as aio

        self.client = aio.InferenceServerClient(address)
        self.inputs = triton_inputs(feeds)

    async def infer(self, model: str, feeds) -> None:
        await self.client.infer(model, self.inputs, client_timeout=CALL_TIMEOUT_S)

    async def close(self) -> None:
        await self.client.close()


class ThreadedSession:
    """The ORT session run from IN_FLIGHT threads, behind the same `infer` call: ORT alone
    with IN_FLIGHT requests in flight."""

    def __init__(self, sess, pool: ThreadPoolExecutor):
        self.sess, self.pool = sess, pool

    async def infer(self, model: str, feeds) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self.sess.run, None, feeds)

    async def close(self) -> None:
        pass


def rate_of(make_client: Callable[[], TritonAio | ThreadedSession], name: str, feeds,
            seconds: float) -> float:
    """Requests/s with IN_FLIGHT outstanding (runtime_overhead's pipeline_rate), through a
    client made for this measurement alone."""
    async def measure() -> float:
        client = make_client()
        try:
            return await pipeline_rate(client, name, feeds, IN_FLIGHT, seconds)
        finally:
            await client.close()
    return asyncio.run(measure())


def ort_contender(w: Workload, stack: contextlib.ExitStack) -> Contender:
    sess = session(w.path, THREADS)
    pool = stack.enter_context(ThreadPoolExecutor(IN_FLIGHT))

    def latency(seconds: float) -> list[float]:
        times: list[float] = []
        sample(lambda: sess.run(None, w.feeds), seconds, times)
        return times

    return Contender("ort", latency, lambda s: rate_of(lambda: ThreadedSession(sess, pool),
                                                       w.name, w.feeds, s))


def checked_client(address: str, model: str, w: Workload):
    """A blocking tritonclient whose first answer matched ONNX Runtime's (Unavailable if
    not: a server that computes something else is no peer)."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    inputs = triton_inputs(w.feeds)
    try:
        result = client.infer(model, inputs, client_timeout=CALL_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - whatever the server says, one line
        client.close()
        raise Unavailable(f"first request failed: {str(error).splitlines()[0]}") from None
    names = [o.name for o in result.get_response().outputs]
    got = [result.as_numpy(n) for n in names]
    if len(got) != len(w.expected) or not all(
            np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, w.expected)):
        client.close()
        raise Unavailable("its answer differs from ONNX Runtime's")
    return client, inputs


def server_contender(key: str, w: Workload, stack: contextlib.ExitStack) -> Contender:
    address, model = SERVERS[key](w, stack)
    client, inputs = checked_client(address, model, w)
    stack.callback(client.close)

    def latency(seconds: float) -> list[float]:
        times: list[float] = []
        sample(lambda: client.infer(model, inputs, client_timeout=CALL_TIMEOUT_S), seconds,
               times)
        return times

    return Contender(key, latency,
                     lambda s: rate_of(lambda: TritonAio(address, w.feeds), model, w.feeds, s))


def peer_missing(key: str) -> str | None:
    module = PEER_MODULES.get(key)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -r benchmarks/serving-peers.txt)"
    return None


def skip(skipped: list[str], line: str) -> None:
    """One line for what is left out (printed now, and kept for the markdown file)."""
    console.print(line)
    skipped.append(line)


def contenders(keys: list[str], w: Workload, stack: contextlib.ExitStack,
               skipped: list[str]) -> list[Contender]:
    """Every contender of `keys` that runs here; one line for each that does not."""
    found = []
    for key in keys:
        try:
            missing = peer_missing(key)
            if missing:
                raise Unavailable(missing)
            console.print(f"[dim]{w.name}: starting {LABELS[key]}...[/dim]")
            found.append(ort_contender(w, stack) if key == "ort"
                         else server_contender(key, w, stack))
        except Unavailable as why:
            skip(skipped, f"{w.name}: skipping {LABELS[key]}: {why}")
        except Exception as error:  # noqa: BLE001 - a peer's own failure: one line, no row
            if key not in PEER_MODULES:
                raise
            skip(skipped, f"{w.name}: skipping {LABELS[key]}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}")
    return found


# --- measuring and reporting ----------------------------------------------------------------

def measure(found: list[Contender], seconds: float, rounds: int) -> dict[str, Rounds]:
    """Rounds visiting every contender, the order rotated each round."""
    results = {c.key: Rounds() for c in found}
    for c in found:                      # warm-up: connections, arenas, first-call paths
        c.latency(min(seconds, 0.3))
    for r in range(rounds):
        for c in found[r % len(found):] + found[:r % len(found)]:
            times = c.latency(seconds)
            results[c.key].p50.append(statistics.median(times))
            results[c.key].p99.append(float(np.percentile(times, 99)))
            results[c.key].rate.append(c.rate(seconds))
    return results


def spread(values: list[float], fmt: str) -> str:
    """The median of per-round values with their range."""
    return (f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"
            if len(values) > 1 else f"{values[0]:{fmt}}")


COLUMNS = ("model", "server", "p50 ms", "p99 ms", f"req/s, {IN_FLIGHT} in flight",
           "p50 over ORT alone, ms", "req/s vs ORT alone")


def rows_of(name: str, results: dict[str, Rounds]) -> list[list[str]]:
    ort = results.get("ort")
    rows = []
    for key, r in results.items():
        over = vs = "-"
        if ort is not None and key != "ort":
            over = spread([(a - b) * 1e3 for a, b in zip(r.p50, ort.p50)], "+.3f")
            vs = spread([a / b for a, b in zip(r.rate, ort.rate)], ".2f")
        rows.append([name, LABELS[key], spread([t * 1e3 for t in r.p50], ".3f"),
                     spread([t * 1e3 for t in r.p99], ".3f"), spread(r.rate, ".0f"), over, vs])
    return rows


def print_table(rows: list[list[str]], title: str) -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "server") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header_lines(args: argparse.Namespace, skipped: list[str]) -> list[str]:
    import onnxruntime as ort
    from benchmarks.optimizer_models import commit
    from wpk.optimizer.measure import hardware_id

    lines = [f"Machine: {hardware_id()}, {os.cpu_count()} CPUs; ONNX Runtime {ort.__version__}"
             f", {THREADS} intra-op thread everywhere; commit {commit()}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}.", "",
             f"Command: `python benchmarks/serving_peers.py {' '.join(sys.argv[1:])}`", "",
             f"Median of {args.rounds} rounds of {args.seconds:g} s per figure, their range in "
             "brackets [min, max]."]
    return lines + [f"Skipped: {line}" for line in skipped]


# --- command line ---------------------------------------------------------------------------

def bench_model(name: str, root: Path, keys: list[str], args: argparse.Namespace,
                skipped: list[str]) -> list[list[str]]:
    """The table rows of one model; every server it started is stopped on return."""
    try:
        w = workload(name, root)
    except Unavailable as why:
        skip(skipped, f"{name}: skipping the model: {why}")
        return []
    with contextlib.ExitStack() as stack:
        found = contenders(keys, w, stack, skipped)
        if not found:
            return []
        console.print(f"[dim]{w.name}: measuring {len(found)} contenders, {args.rounds} "
                      f"rounds...[/dim]")
        rows = rows_of(w.name, measure(found, args.seconds, args.rounds))
    print_table(rows, f"{w.name}: tritonclient gRPC, ORT {THREADS} thread, "
                      f"{os.cpu_count()} CPUs")
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet_like,resnet18",
                        help="built-in examples, resnet18 (needs torch) or .onnx paths")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"which of {', '.join(CONTENDERS)}")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="per measurement (latency, then throughput) per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", metavar="FILE", help="also write the table here")
    parser.add_argument("--pytriton-serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--contenders: unknown {', '.join(sorted(unknown))}")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.pytriton_serve:
        serve_pytriton(args.pytriton_serve, args.name, args.grpc_port, args.http_port,
                       args.workspace)
        return 0
    keys = [k for k in CONTENDERS if k in args.contenders.split(",")]
    rows: list[list[str]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wpk-peers-") as tmp:
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            rows += bench_model(name, Path(tmp), keys, args, skipped)
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, header_lines(args, skipped)))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
