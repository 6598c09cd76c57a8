"""Transport security between nodes: a network CA and the node certificates it issues.

Every node serves gRPC with a certificate from the network CA and requires the same of its
callers (mutual TLS), so a process without a CA-issued certificate cannot talk to the
network. Certificates use ECDSA P-256 (widely supported by TLS stacks); node identity and
message signatures stay on the separate Ed25519 key in ``identity``.

All certificates carry the DNS name ``TARGET_NAME``; clients verify the server against it
(gRPC's ``ssl_target_name_override``) because nodes are dialled by changing IPs and DNS
names, while the chain to the network CA is what proves membership.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TARGET_NAME = "pyrsia-node"
_VALIDITY = dt.timedelta(days=3650)


class TlsError(Exception):
    """Certificate files are missing or unusable."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    key_pem: bytes
    cert_pem: bytes


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(chain_id: str, now: dt.datetime | None = None) -> KeyPair:
    """A self-signed CA for one network."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pyrsia network CA {chain_id}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
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
    return KeyPair(_private_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def issue_node_certificate(
    ca: KeyPair, node_name: str, hosts: tuple[str, ...] = (), now: dt.datetime | None = None
) -> KeyPair:
    """A server-and-client certificate for one node, signed by the network CA."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError("the network CA key must be an ECDSA key")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(TARGET_NAME)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(_private_pem(key), cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True, slots=True)
class NodeTls:
    """What a node needs for mutual TLS: the network CA and its own key pair."""

    ca_cert_pem: bytes
    node: KeyPair

    @classmethod
    def load(cls, keys_dir: Path, ca_cert_pem: bytes) -> NodeTls:
        try:
            node = KeyPair((keys_dir / "tls.key").read_bytes(), (keys_dir / "tls.crt").read_bytes())
        except OSError as exc:
            raise TlsError(
                f"no TLS certificate for this node in {keys_dir} ({exc.strerror}); create one "
                "with 'pyrsia genesis' or run with insecure_plaintext for debugging"
            ) from exc
        return cls(ca_cert_pem, node)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.node.key_pem, self.node.cert_pem)],
            root_certificates=self.ca_cert_pem,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert_pem,
            private_key=self.node.key_pem,
            certificate_chain=self.node.cert_pem,
        )


def save_key_pair(keys_dir: Path, pair: KeyPair, stem: str = "tls") -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    key_path = keys_dir / f"{stem}.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(pair.key_pem)
    (keys_dir / f"{stem}.crt").write_bytes(pair.cert_pem)
