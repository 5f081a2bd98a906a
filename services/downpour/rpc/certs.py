"""A throw-away certificate authority for local clusters and tests (needs ``cryptography``).

    files = make_cluster_pki("run/tls")   # ca.pem, node.pem/node.key, token
    # every service: --tls-cert node.pem --tls-key node.key --tls-client-ca ca.pem --token-file token

One CA signs one node certificate for 127.0.0.1 and localhost, usable both
as a server and as a client certificate (mutual TLS between the services).
Production clusters bring their own PKI (cert-manager, a corporate CA).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str = "downpour local CA", days: int = 30):
    """(certificate, key) of a self-signed CA."""

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert, ca_key, common_name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30):
    """(certificate, key) for ``common_name``, valid for ``hosts``, as a server and as a client."""

    key = _key()
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if common_name not in hosts:
        sans.append(x509.DNSName(common_name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_pair(directory: str | os.PathLike, stem: str, cert, key) -> tuple[str, str]:
    """Write ``<stem>.pem`` and ``<stem>.key`` (mode 0600); returns their paths."""

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cp, kp = d / f"{stem}.pem", d / f"{stem}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_pem_key(key))
    return str(cp), str(kp)


def write_token(path: str | os.PathLike) -> str:
    """A fresh random bearer token in ``path`` (mode 0600); returns the token."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def make_cluster_pki(directory: str | os.PathLike, token: bool = True) -> dict[str, str]:
    """A CA, one node certificate and (``token``) one shared token in ``directory``; returns their
    paths (and the token). Per-role tokens: ``downpour.rpc.rights.write_role_credentials``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca_cert, ca_key = make_ca()
    ca_pem, _ = write_pair(d, "ca", ca_cert, ca_key)
    cert, key = issue(ca_cert, ca_key, "downpour-node")
    node_pem, node_key = write_pair(d, "node", cert, key)
    files = {"ca": ca_pem, "cert": node_pem, "key": node_key}
    if token:
        files["token_file"] = str(d / "token")
        files["token"] = write_token(files["token_file"])
    return files
