"""Mutual TLS: a tier with a certificate from our CA gets through, anyone else is refused."""
from __future__ import annotations

import asyncio
import stat

import grpc
import pytest

from wpk.deploy import tls
from wpk.errors import WpkError

METHOD = "/wpk.test.Echo/Echo"


def _echo_handler():
    async def echo(request: bytes, context) -> bytes:
        return request

    return grpc.method_handlers_generic_handler("wpk.test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})


async def _call(port: int, creds: grpc.ChannelCredentials | None, peer: str = "edge") -> bytes:
    target = f"127.0.0.1:{port}"
    if creds is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, creds, tls.target_name_options(peer))
    async with channel:
        return await channel.unary_unary(METHOD)(b"ping", timeout=5)


async def _with_server(creds_dir, check):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_echo_handler()])
    port = server.add_secure_port("127.0.0.1:0",
                                  tls.server_credentials(tls.load(creds_dir, "edge")))
    await server.start()
    try:
        await check(port)
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    good = tls.generate(tmp_path_factory.mktemp("pki"), ["device", "edge", "cloud"])
    rogue = tls.generate(tmp_path_factory.mktemp("rogue"), ["device"])  # another CA
    return good, rogue


def test_files_and_key_permissions(pki):
    good, _ = pki
    for name in ("ca.pem", "ca.key", "device.pem", "device.key", "edge.pem", "cloud.key"):
        assert (good / name).exists(), name
    assert stat.S_IMODE((good / "edge.key").stat().st_mode) == 0o600
    creds = tls.load(good, "device")
    assert tls.fingerprint(creds.cert) != tls.fingerprint(tls.load(good, "edge").cert)


def test_peer_with_our_certificate_is_accepted(pki):
    good, _ = pki

    async def check(port):
        reply = await _call(port, tls.channel_credentials(tls.load(good, "device")))
        assert reply == b"ping"

    asyncio.run(_with_server(good, check))


@pytest.mark.parametrize("who", ["other-ca", "no-client-cert", "plaintext", "wrong-name"])
def test_peer_without_the_right_certificate_is_refused(pki, who):
    good, rogue = pki
    if who == "other-ca":
        # trusts our CA (so it would accept the server) but presents a certificate from another
        rogue_creds = tls.load(rogue, "device")
        creds = grpc.ssl_channel_credentials(tls.load(good, "device").ca, rogue_creds.key,
                                             rogue_creds.cert)
    elif who == "no-client-cert":
        creds = grpc.ssl_channel_credentials(tls.load(good, "device").ca)
    elif who == "plaintext":
        creds = None
    else:  # a valid client that expects the server to be "cloud": server name check fails
        creds = tls.channel_credentials(tls.load(good, "device"))

    async def check(port):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(port, creds, peer="cloud" if who == "wrong-name" else "edge")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(_with_server(good, check))


def test_generate_reuses_the_ca_for_new_tiers(pki, tmp_path):
    tls.generate(tmp_path, ["device"])
    ca = (tmp_path / "ca.pem").read_bytes()
    tls.generate(tmp_path, ["gateway"])
    assert (tmp_path / "ca.pem").read_bytes() == ca

    async def check(port):  # "gateway" is trusted by a server of the first batch
        assert await _call(port, tls.channel_credentials(tls.load(tmp_path, "gateway"))) == b"ping"

    tls.generate(tmp_path, ["edge"])
    asyncio.run(_with_server(tmp_path, check))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(WpkError, match="edge.pem"):
        tls.load(tmp_path, "edge")


@pytest.mark.parametrize("junk", ["ca.pem", "ca.key"])
def test_a_junk_ca_is_one_line_through_wpk_deploy(three_tier_plan, tmp_path, junk, capsys):
    from wpk.deploy.cli import main

    tls.generate(tmp_path / "pki", ["device"])
    (tmp_path / "pki" / junk).write_text("not a PEM file\n")
    assert main([str(three_tier_plan), "--bundle", str(tmp_path / "b"), "--tls",
                 str(tmp_path / "pki")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wpk: error: ") and len(err.strip().splitlines()) == 1, err
    assert "ca.pem and ca.key are not a PEM certificate and its unencrypted key" in err


# -- real tier servers (wpk-serve --tls-dir) -----------------------------------------------
def _serve(plan_dir, tier, tls_dir=None, next_address=None):
    import subprocess
    import sys

    from wpk.deploy.emulate import _read_line_with

    argv = [sys.executable, "-m", "wpk.runtime.server", str(plan_dir), "--tier", tier,
            "--port", "0"]
    if tls_dir:
        argv += ["--tls-dir", str(tls_dir)]
    if next_address:
        argv += ["--next", next_address]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = _read_line_with(process, "ready on", 30)
    assert line, process.stderr.read()
    return process, line.split("ready on ")[1].split()[0]


async def _infer(plan, address, creds):
    import numpy as np

    from wpk.runtime import protocol as pb
    from wpk.runtime.client import channel_options
    from wpk.runtime.infer_messages import build_request, parse_response

    spec = plan.model.inputs[0]
    x = np.ones(spec.shape, dtype=np.float32)
    options = channel_options() + tls.target_name_options("device")
    async with grpc.aio.secure_channel(address, creds, options) as channel:
        response = await pb.Stub(channel).ModelInfer(build_request(plan.name, {spec.name: x}),
                                                     timeout=20)
    return parse_response(response)


@pytest.fixture()
def tls_pipeline(three_tier_plan, pki):
    """cloud <- edge <- device, every hop mutually authenticated."""
    good, _ = pki
    processes, address = [], None
    try:
        for tier in ("cloud", "edge", "device"):
            process, address = _serve(three_tier_plan, tier, good, address)
            processes.append((tier, process, address))
        yield {tier: addr for tier, _, addr in processes}
    finally:
        for _, process, _ in processes:
            process.terminate()
        for _, process, _ in processes:
            process.wait(timeout=10)


def test_tls_pipeline_serves_a_client_with_our_certificate(three_tier_plan, pki, tls_pipeline):
    from wpk.plan import load_plan

    plan = load_plan(three_tier_plan)
    outputs = asyncio.run(_infer(plan, tls_pipeline["device"],
                                 tls.channel_credentials(tls.load(pki[0], "device"))))
    assert set(outputs) == {o.name for o in plan.model.outputs}


def test_a_tier_without_the_right_certificate_is_refused(three_tier_plan, pki, tls_pipeline):
    """A rogue device tier (its certificate signed by another CA) forwards to the real edge:
    the edge refuses the handshake, so the request fails."""
    from wpk.plan import load_plan

    good, rogue = pki
    plan = load_plan(three_tier_plan)
    # the rogue tier trusts our CA (so it would accept the edge) but cannot prove itself
    mixed = rogue.parent / "mixed"
    mixed.mkdir(exist_ok=True)
    (mixed / "ca.pem").write_bytes((good / "ca.pem").read_bytes())
    for suffix in (".pem", ".key"):
        (mixed / f"device{suffix}").write_bytes((rogue / f"device{suffix}").read_bytes())
    process, address = _serve(three_tier_plan, "device", mixed, tls_pipeline["edge"])
    try:
        # the client trusts the rogue server and is trusted by it: only the next hop can fail
        ours = tls.load(good, "device")
        client = grpc.ssl_channel_credentials((rogue / "ca.pem").read_bytes(), ours.key,
                                              ours.cert)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(_infer(plan, address, client))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "edge" in info.value.details()
    finally:
        process.terminate()
        process.wait(timeout=10)
    # and a plain-text caller gets nowhere at the real device either
    async def plaintext():
        async with grpc.aio.insecure_channel(tls_pipeline["device"]) as channel:
            await channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"",
                                                                                   timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(plaintext())


def test_servers_answer_the_standard_health_check(three_tier_plan):
    from wpk.runtime.health import SERVING, HealthCheckRequest, HealthCheckResponse

    process, address = _serve(three_tier_plan, "cloud")

    async def check(service):
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/grpc.health.v1.Health/Check",
                                       request_serializer=HealthCheckRequest.SerializeToString,
                                       response_deserializer=HealthCheckResponse.FromString)
            return await call(HealthCheckRequest(service=service), timeout=5)

    try:
        assert asyncio.run(check("")).status == SERVING
        assert asyncio.run(check("inference.GRPCInferenceService")).status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(check("no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        process.terminate()
        process.wait(timeout=10)
