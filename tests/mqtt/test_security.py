"""TLS (server and client certificates) and username/password towards the broker."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from wpk.bridge.broker import wait_port
from wpk.bridge.config import BridgeConfig, BrokerConfig, Route

from .helpers import BridgeThread, Client, Mosquitto, check_results, free_port, json_input

pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
                                reason="needs openssl and mosquitto_passwd")


def make_certificates(directory) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=wpk test CA")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=wpk {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext")
    return {name: str(directory / name) for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def secure_broker(tmp_path):
    certs = make_certificates(tmp_path)
    password_file = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(password_file), "plant", "s3cret"],
                   check=True, capture_output=True)
    password_file.chmod(0o600)
    tls_port = free_port()
    broker = Mosquitto(tmp_path / "broker", extra="\n".join([
        "allow_anonymous false",
        f"password_file {password_file}",
        f"listener {tls_port} 127.0.0.1", f"cafile {certs['ca.crt']}",
        f"certfile {certs['server.crt']}", f"keyfile {certs['server.key']}",
        "require_certificate true", ""]))
    # broker_config() says allow_anonymous true first; the later line wins in Mosquitto.
    broker.start()
    wait_port(tls_port)   # start() waits for the plain listener only
    yield broker, tls_port, certs
    broker.stop()


def test_tls_with_client_certificate_and_password(secure_broker, pipeline, reference):
    broker, tls_port, certs = secure_broker
    config = BridgeConfig(
        broker=BrokerConfig(port=tls_port, client_id="bridge-tls", username="plant",
                            password="s3cret", tls_ca=certs["ca.crt"],
                            tls_cert=certs["client.crt"], tls_key=certs["client.key"]),
        pipeline=pipeline.address,
        routes=[Route("s/in", "s/out", format="json", model=pipeline.model)])
    bridge = BridgeThread(config).start()  # start() waits for the TLS connection
    client = Client(broker.port, "t-tls", ["s/out"], username="plant", password="s3cret")
    try:
        for i in range(5):
            client.publish("s/in", json_input(i), wait=False)
        client.wait_count(5)
        check_results(client.json_messages(), range(5), reference)
    finally:
        client.close()
        bridge.stop()


def test_wrong_password_is_refused(secure_broker, pipeline):
    broker, tls_port, certs = secure_broker
    config = BridgeConfig(
        broker=BrokerConfig(port=tls_port, client_id="bridge-bad", username="plant",
                            password="wrong", tls_ca=certs["ca.crt"],
                            tls_cert=certs["client.crt"], tls_key=certs["client.key"]),
        pipeline=pipeline.address,
        routes=[Route("s/in", "s/out", format="json", model=pipeline.model)])
    bridge = BridgeThread(config)
    with pytest.raises(TimeoutError):
        bridge.start(timeout_s=2)
    bridge.stop()


def test_mutual_tls_to_the_pipeline(broker, plan_dir, reference, tmp_path):
    """Tiers served with --tls-dir accept the bridge only with a certificate from their CA."""
    pytest.importorskip("cryptography")
    from wpk.deploy.tls import generate

    from .helpers import Deployment

    pki = generate(tmp_path / "pki", ["device", "edge", "cloud", "bridge"])
    deployment = Deployment(plan_dir, serve_args=["--tls-dir", str(pki)]).start()
    try:
        config = BridgeConfig(
            broker=BrokerConfig(port=broker.port, client_id="bridge-mtls"),
            pipeline=deployment.address, pipeline_tls=str(pki), pipeline_server_name="device",
            routes=[Route("m/in", "m/out", format="json", model=deployment.model)])
        bridge = BridgeThread(config).start()
        client = Client(broker.port, "t-mtls", ["m/out"])
        try:
            for i in range(5):
                client.publish("m/in", json_input(i), wait=False)
            client.wait_count(5)
            check_results(client.json_messages(), range(5), reference)
        finally:
            client.close()
            bridge.stop()
    finally:
        deployment.kill()
