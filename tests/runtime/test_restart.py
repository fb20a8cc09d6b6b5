"""A downstream tier process killed while requests are in flight over the link to it (the
tensor link; gRPC between TLS tiers), then restarted on the same port: callers see
UNAVAILABLE naming it, then succeed again."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest

from .conftest import Pipeline, free_port
from .test_pipeline import model_feeds
from wpk.runtime.client import InferenceClient
from wpk.runtime.status import TierError


def start_tier(plan_dir, tier: str, port: int, tls_dir=None) -> subprocess.Popen:
    tls = ["--tls-dir", str(tls_dir)] if tls_dir else []
    process = subprocess.Popen([sys.executable, "-m", "wpk.runtime.server", str(plan_dir),
                                "--tier", tier, "--port", str(port), "--threads", "1", *tls],
                               stdout=subprocess.PIPE, text=True)
    assert "ready on" in process.stdout.readline()
    return process


async def load_until(client: InferenceClient, model: str, feeds, done, outcomes: list,
                     workers: int = 6) -> None:
    """`workers` callers in a loop until `done()`; every outcome recorded, none left hanging."""
    async def worker():
        while not done():
            try:
                await client.infer(model, feeds, timeout=4)
                outcomes.append((time.monotonic(), "OK", ""))
            except TierError as error:
                outcomes.append((time.monotonic(), error.code.name, error.details))
                await asyncio.sleep(0.005)
    await asyncio.gather(*(worker() for _ in range(workers)))


@pytest.mark.parametrize("link", ["tcp", "grpc"])
def test_killed_then_restarted_tier_gives_unavailable_then_answers_again(plans, link,
                                                                        tmp_path):
    """With the tensor link, the restarted tier listens on a new tensor-link port: the link
    finds it again through ServerMetadata. TLS tiers talk gRPC (ModelInfer calls)."""
    pki = credentials = None
    if link == "grpc":
        from wpk.deploy.tls import generate
        from wpk.runtime import tls

        pki = generate(tmp_path / "pki", ["device", "edge", "cloud", "client"])
        credentials = tls.channel_credentials(tls.load(pki, "client"))
    port = free_port()
    cloud = start_tier(plans["mlp"], "cloud", port, pki)
    pipeline = Pipeline(plans["mlp"], next_override={"edge": f"127.0.0.1:{port}"}, tls_dir=pki)
    feeds = model_feeds(plans["mlp"])
    outcomes: list[tuple[float, str, str]] = []
    marks: dict[str, float] = {}

    async def scenario():
        nonlocal cloud
        async with InferenceClient(pipeline.entry, credentials=credentials,
                                   server_name="device") as client:
            state = {"done": False}
            load = asyncio.ensure_future(load_until(client, "mlp", feeds, lambda: state["done"],
                                                    outcomes))
            deadline = time.monotonic() + 30
            while sum(1 for o in outcomes if o[1] == "OK") < 20:
                assert time.monotonic() < deadline, "fewer than 20 answers before the kill"
                await asyncio.sleep(0.01)
            marks["killed"] = time.monotonic()
            cloud.send_signal(signal.SIGKILL)   # requests are in flight over edge -> cloud
            await asyncio.get_running_loop().run_in_executor(None, cloud.wait)
            deadline = time.monotonic() + 30
            while sum(1 for o in outcomes if o[0] > marks["killed"] and o[1] != "OK") < 20:
                assert time.monotonic() < deadline, "fewer than 20 failures after the kill"
                await asyncio.sleep(0.01)
            cloud = await asyncio.get_running_loop().run_in_executor(
                None, start_tier, plans["mlp"], "cloud", port, pki)
            marks["restarted"] = time.monotonic()
            deadline = time.monotonic() + 10
            while not any(o[0] > marks["restarted"] and o[1] == "OK" for o in outcomes):
                assert time.monotonic() < deadline, "no answer after the tier came back"
                await asyncio.sleep(0.01)
            state["done"] = True
            await load

    try:
        asyncio.run(scenario())
    finally:
        cloud.kill()
        cloud.wait()
        pipeline.close()
    failures = [o for o in outcomes if o[1] != "OK"]
    assert failures and all(o[0] > marks["killed"] for o in failures)
    for _, code, details in failures:   # never INTERNAL, never a hang until the deadline
        assert code == grpc.StatusCode.UNAVAILABLE.name, (code, details)
        assert "tier 'cloud' at" in details, details
    assert any(o[0] > marks["restarted"] and o[1] == "OK" for o in outcomes)
    assert pipeline.services["edge"].link.kind == link
