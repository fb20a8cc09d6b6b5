"""wpk-deploy --local and wpk-serve as real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .conftest import deploy_table, free_port
from .test_pipeline import model_feeds, triton_infer
from wpk.deploy.local import LocalDeployment
from wpk.errors import WpkError


def test_local_deployment_serves_and_a_killed_tier_gives_unavailable(plans):
    port = free_port()
    with LocalDeployment(plans["mlp"], port=port, threads=1) as deployment:
        edge = triton.InferenceServerClient(deployment.tiers[1].address)
        extensions = edge.get_server_metadata().extensions
        # the tensor link advertises its port
        assert any(e.startswith("wpk-tensor-link:") for e in extensions)
        assert deployment.entry == f"127.0.0.1:{port}"
        # every tier's tensor link is on its ready line, the entry tier's included
        assert all(t.link_address is not None for t in deployment.tiers)
        assert [t.tier for t in deployment.tiers] == ["device", "edge", "cloud"]
        assert deployment.tiers[0].models == ("mlp", "mlp.device")
        feeds = model_feeds(plans["mlp"])
        assert triton_infer(deployment.entry, "mlp", feeds).as_numpy("softmax_16_out") \
            .sum() == pytest.approx(1.0, abs=1e-5)
        cloud = deployment.tiers[2].process
        cloud.send_signal(signal.SIGKILL)
        cloud.wait()
        with pytest.raises(InferenceServerException) as info:
            triton_infer(deployment.entry, "mlp", feeds, client_timeout=10)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "tier 'cloud'" in info.value.message()
        assert deployment.poll() is deployment.tiers[2]
        assert triton.InferenceServerClient(deployment.entry).is_server_live()
    assert all(t.process.poll() is not None for t in deployment.tiers)


def test_tiers_start_from_a_directory_that_holds_a_folder_named_wpk(plans, tmp_path,
                                                                    monkeypatch):
    """The parent of a clone called `wpk`: `python -m` put that folder first on the tiers'
    import path, and every tier failed with "cannot import name '__version__' from 'wpk'"."""
    (tmp_path / "wpk").mkdir()
    (tmp_path / "wpk" / "README.md").write_text("a clone, not the package\n")
    monkeypatch.chdir(tmp_path)
    with LocalDeployment(plans["mlp"], port=free_port(), threads=1) as deployment:
        feeds = model_feeds(plans["mlp"])
        assert triton_infer(deployment.entry, "mlp", feeds).as_numpy("softmax_16_out") \
            .sum() == pytest.approx(1.0, abs=1e-5)


def test_wpk_deploy_max_batch_reaches_every_tier(plans):
    """--max-batch on wpk-deploy becomes each tier's wpk-serve --max-batch: their metrics
    count batches once requests have passed."""
    import urllib.request

    from wpk.deploy.cli import batching_arguments, build_parser

    args = build_parser().parse_args([str(plans["mlp"]), "--local", "--max-batch", "4",
                                      "--max-queue-delay-us", "500"])
    assert batching_arguments(args) == ["--max-batch", "4", "--max-queue-delay-us", "500"]
    assert batching_arguments(build_parser().parse_args([str(plans["mlp"]), "--local"])) == []
    with LocalDeployment(plans["mlp"], port=free_port(), threads=1,
                         serve_args=batching_arguments(args)) as deployment:
        feeds = model_feeds(plans["mlp"])
        for _ in range(3):
            triton_infer(deployment.entry, "mlp", feeds)
        for handle in deployment.tiers:
            text = urllib.request.urlopen(handle.metrics_url, timeout=5).read().decode()
            batches = [line for line in text.splitlines()
                       if line.startswith("wpk_batches_total")]
            assert batches and float(batches[0].split()[-1]) >= 3, (handle.tier, batches)


def test_wpk_deploy_prints_endpoints_and_stops_all_on_sigterm(plans):
    """(`--link grpc`, a removed transport, is one warning line and the tensor link.)"""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "wpk.deploy.cli", str(plans["mlp"]),
                                "--local", "--port", str(port), "--threads", "1",
                                "--link", "grpc"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("entry:"):
                break
        assert f"entry: 127.0.0.1:{port} (model 'mlp')" in "".join(lines)
        pids = [int(cells[5]) for cells in deploy_table(lines).values()]
        assert len(pids) == 3
        assert all(cells[3] != "-" for cells in deploy_table(lines).values())  # tensor links
        feeds = model_feeds(plans["mlp"])
        triton_infer(f"127.0.0.1:{port}", "mlp", feeds)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        warned = [line for line in process.stderr.read().splitlines() if "--link grpc" in line]
        assert len(warned) == 1 and warned[0].startswith("wpk: warning: --link grpc: gRPC "
                                                         "streams between tiers were removed")
        time.sleep(0.2)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        stop_deploy(process)


def test_wpk_deploy_restarts_a_crashed_tier_and_the_others_keep_serving(plans):
    """A killed edge tier once took the whole local deployment down. It is the embedded
    default: the dead tier comes back on its ports, the others never stop, and the restart
    shows on the console and in the tier's metrics."""
    import queue
    import threading
    import urllib.request

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "wpk.deploy.cli", str(plans["mlp"]),
                                "--local", "--port", str(port), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()

    def read_until(fragment: str, timeout: float = 60) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
            if fragment in seen[-1]:
                return seen
        raise AssertionError(f"no {fragment!r} in: {''.join(seen)}")

    try:
        table = read_until("entry:")
        rows = deploy_table(table)
        pids = {tier: int(cells[5]) for tier, cells in rows.items()}
        edge_metrics = rows["edge"][4]
        feeds = model_feeds(plans["mlp"])
        triton_infer(f"127.0.0.1:{port}", "mlp", feeds)
        os.kill(pids["edge"], signal.SIGKILL)
        read_until("tier edge exited with code -9; restarting it in 0.5 s")
        read_until("tier edge restarted (restart 1")
        answer = triton_infer(f"127.0.0.1:{port}", "mlp", feeds, client_timeout=30)
        assert answer.as_numpy("softmax_16_out").sum() == pytest.approx(1.0, abs=1e-5)
        for tier in ("device", "cloud"):          # never stopped
            os.kill(pids[tier], 0)
        assert process.poll() is None
        metrics_port = edge_metrics.rpartition(":")[2].split("/")[0]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert 'wpk_tier_restarts{tier="edge"} 1' in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        stop_deploy(process)


@pytest.mark.parametrize("limit", [8, None])
def test_a_flood_on_one_connection_gets_answers_or_resource_exhausted_never_cancelled(plans,
                                                                                   limit):
    """3,000 requests at once on one connection: gRPC's core used to cancel those beyond
    about 1,000 it had not handed over (a bare CANCELLED). Each gets an answer, or, beyond
    --max-in-flight, RESOURCE_EXHAUSTED saying so, so that a client knows to back off."""
    import asyncio
    from collections import Counter

    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc

    feeds = model_feeds(plans["mlp"])
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[
        array.tobytes() for array in feeds.values()])
    for name, array in feeds.items():
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))

    async def flood(address: str) -> Counter:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> str:
                try:
                    await stub.ModelInfer(request, timeout=120)
                    return "OK"
                except grpc.aio.AioRpcError as error:
                    return f"{error.code().name}: {error.details()}"
            return Counter(await asyncio.gather(*[one() for _ in range(3000)]))

    serve_args = ["--max-in-flight", str(limit)] if limit else []
    with LocalDeployment(plans["mlp"], port=free_port(), threads=1,
                         serve_args=serve_args) as deployment:
        outcomes = asyncio.run(flood(deployment.entry))
    refused = ("RESOURCE_EXHAUSTED: tier 'device': 8 requests in flight, the most it holds "
               "(wpk-serve --max-in-flight); retry later")
    assert set(outcomes) <= {"OK", refused}, outcomes
    assert outcomes["OK"] >= (8 if limit else 3000), outcomes
    if limit:
        assert outcomes[refused] > 0, outcomes


def stop_deploy(process: subprocess.Popen) -> None:
    """SIGTERM first: wpk-deploy then stops its tiers (SIGKILL would orphan them)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--tier", "edge"], "no plan here"),
])
def test_wpk_serve_missing_plan_is_a_one_line_error(tmp_path, args, message):
    result = run_cli("wpk.runtime.server", str(tmp_path / "none"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("wpk: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_wpk_serve_input_errors_are_one_line(plans):
    result = run_cli("wpk.runtime.server", str(plans["mlp"]), "--tier", "fog", "--port", "0")
    assert result.returncode == 2 and "plan has no tier 'fog'" in result.stderr
    result = run_cli("wpk.runtime.server", str(plans["mlp"]), "--tier", "device", "--port", "0")
    assert result.returncode == 2
    assert "give its address with --next HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_deployment_reports_a_tier_that_fails_to_start(plans):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        deployment = LocalDeployment(plans["mlp"], port=port)
        with pytest.raises(WpkError, match="tier 'device' exited with code 2"):
            deployment.start()
    # the tiers that did start were stopped again
    assert len(deployment.tiers) == 3
    assert all(t.process.poll() is not None for t in deployment.tiers)
