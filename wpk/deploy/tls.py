"""Mutual TLS between tiers: a private CA, one certificate per tier, gRPC credentials.

`generate(DIR, ["device", "edge", "cloud"])` writes

    DIR/ca.pem            the CA certificate every tier trusts (and nothing else)
    DIR/ca.key            the CA key: keep it off the tiers (bundles do not copy it)
    DIR/<tier>.pem/.key   the tier's certificate and key, valid as server AND client

Each tier certificate names the tier (CN and a DNS SAN), any extra hosts given for it (DNS
names or IP addresses) and 127.0.0.1. Servers built with `server_credentials` require a client
certificate signed by the CA, so a peer without one (or with one from another CA) is refused
during the handshake; channels built with `channel_credentials` present the tier's own
certificate. Clients verify a server against the tier name (`target_name_options`), so
addresses may change (namespaces, Kubernetes pod IPs) without reissuing certificates.

Uses the `cryptography` package (EC P-256 keys, SHA-256 signatures).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Mapping, Sequence

from wpk.errors import WpkError
# Loading and gRPC credentials live with the runtime (which uses them); re-exported here.
from wpk.runtime.tls import (CA_CERT, TierCredentials, channel_credentials,  # noqa: F401
                             load, server_credentials, target_name_options)

CA_KEY = "ca.key"
__all__ = ["CA_CERT", "CA_KEY", "TierCredentials", "generate", "load", "has_credentials",
           "server_credentials", "channel_credentials", "target_name_options", "fingerprint"]


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise WpkError("generating certificates needs the 'cryptography' package "
                       "(pip install 'wpk[deploy]'), or pass existing ones with --tls DIR")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san_entries(x509, names: Sequence[str]):
    entries = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def generate(directory: str | Path, tiers: Sequence[str],
             hosts: Mapping[str, Sequence[str]] | None = None, days: int = 365,
             common_name: str = "wpk tiers CA") -> Path:
    """Create a CA and a certificate per tier in `directory` (made if missing).

    An existing CA in `directory` is reused, so certificates for new tiers join the same trust
    domain. Returns the directory.
    """
    x509, hashes, serialization, ec, eku, NameOID = _crypto()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                      encryption_algorithm=serialization.NoEncryption())

    if (directory / CA_CERT).exists() and (directory / CA_KEY).exists():
        try:
            ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (ValueError, TypeError) as error:   # not PEM, or an encrypted key
            reason = str(error).split(".")[0] or type(error).__name__
            raise WpkError(f"{directory}: {CA_CERT} and {CA_KEY} are not a PEM certificate and "
                           f"its unencrypted key ({reason}); fix them or pass a new directory "
                           "to --tls") from None
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        _write_private(directory / CA_KEY, ca_key.private_bytes(**key_format))
        (directory / CA_CERT).write_bytes(ca_cert.public_bytes(pem))

    for tier in tiers:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [tier, *(hosts or {}).get(tier, ()), "127.0.0.1"]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, tier)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(_san_entries(x509, names)),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku.SERVER_AUTH, eku.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(directory / f"{tier}.key", key.private_bytes(**key_format))
        (directory / f"{tier}.pem").write_bytes(cert.public_bytes(pem))
    return directory


def has_credentials(directory: str | Path, tiers: Sequence[str]) -> bool:
    directory = Path(directory)
    return (directory / CA_CERT).exists() and all(
        (directory / f"{t}.pem").exists() and (directory / f"{t}.key").exists() for t in tiers)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate (for logs and reports)."""
    x509, hashes, *_ = _crypto()
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex(":")
