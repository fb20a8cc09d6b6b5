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
