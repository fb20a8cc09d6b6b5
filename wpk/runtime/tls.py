"""Mutual TLS for a tier: its server refuses peers without a certificate from the tiers' CA,
its channel to the next tier presents its own certificate.

One directory holds what a tier needs, as `wpk-deploy --tls` writes it: `ca.pem` (the CA every
tier trusts), `<tier>.pem` and `<tier>.key` (the tier's certificate, valid as server and client).
Clients check the server's certificate against the next tier's *name* (`target_name_options`),
so addresses can change without reissuing certificates. Generation lives in `wpk.deploy.tls`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wpk.errors import WpkError

CA_CERT = "ca.pem"


@dataclass(frozen=True)
class TierCredentials:
    """PEM bytes a tier needs: the CA it trusts, its own certificate chain and key."""

    tier: str
    ca: bytes
    cert: bytes
    key: bytes


def load(directory: str | Path, tier: str) -> TierCredentials:
    """Read `ca.pem`, `<tier>.pem` and `<tier>.key` from `directory`."""
    directory = Path(directory)
    paths = {"ca": directory / CA_CERT, "cert": directory / f"{tier}.pem",
             "key": directory / f"{tier}.key"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise WpkError(f"TLS for tier {tier!r}: missing {', '.join(missing)} "
                       f"(generate them with wpk-deploy PLAN --bundle OUT --tls {directory})")
    data = {kind: path.read_bytes() for kind, path in paths.items()}
    for kind, blob in data.items():
        if b"-----BEGIN" not in blob:
            raise WpkError(f"TLS for tier {tier!r}: {paths[kind]} is not PEM")
    return TierCredentials(tier, data["ca"], data["cert"], data["key"])


def server_credentials(creds: TierCredentials):
    """Server credentials that refuse any client without a CA-signed certificate."""
    import grpc

    return grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca,
                                       require_client_auth=True)


def channel_credentials(creds: TierCredentials):
    """Channel credentials: trust only the CA, present this tier's certificate."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key,
                                        certificate_chain=creds.cert)


def target_name_options(peer_tier: str) -> list[tuple[str, str]]:
    """Channel options that verify the server's certificate against the peer tier's name."""
    return [("grpc.ssl_target_name_override", peer_tier)]
