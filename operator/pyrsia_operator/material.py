"""Key material of a network and its authorities, and its round trip through Secrets.

Keys are created once and then only read back: a regenerated CA or governance key would
split the network, a regenerated node key would change an authority's identity. Formats are
those of ``pyrsia_node`` (PKCS#8 PEM Ed25519 keys, the ``tls`` module's CA and node
certificates), so a node reads what the operator writes without translation.

Generation is random by nature; everything else here is pure.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyrsia_node import tls
from pyrsia_node.identity import Identity, IdentityError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
GOVERNANCE_KEY = "governance.key"
NODE_KEY = "node.key"
TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"


class MaterialError(ValueError):
    """A Secret that should hold key material is missing a key or holds garbage."""


@dataclass(frozen=True, slots=True)
class NetworkKeys:
    """What only the operator holds: the network CA and the governance key."""

    ca: tls.KeyPair
    governance: Identity


def generate_network_keys(chain_id: str) -> NetworkKeys:
    return NetworkKeys(tls.create_ca(chain_id), Identity.generate())


def secret_bytes(secret: Mapping[str, Any], key: str) -> bytes:
    """One value of a Secret, from ``data`` (base64) or, as written, ``stringData``."""
    data = secret.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(data[key], validate=True)
        except ValueError:
            raise MaterialError(f"Secret key {key!r} is not valid base64") from None
    string_data = secret.get("stringData") or {}
    if key in string_data:
        return str(string_data[key]).encode()
    name = (secret.get("metadata") or {}).get("name", "?")
    raise MaterialError(f"Secret {name!r} has no key {key!r}")


def encode_data(values: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(values.items())}


def network_keys_from_secrets(
    ca_secret: Mapping[str, Any], gov_secret: Mapping[str, Any]
) -> NetworkKeys:
    try:
        governance = Identity.from_pem(secret_bytes(gov_secret, GOVERNANCE_KEY))
    except IdentityError as exc:
        raise MaterialError(f"governance key: {exc}") from exc
    return NetworkKeys(
        tls.KeyPair(secret_bytes(ca_secret, CA_KEY), secret_bytes(ca_secret, CA_CERT)), governance
    )


def node_identity_from_secret(secret: Mapping[str, Any]) -> Identity:
    try:
        return Identity.from_pem(secret_bytes(secret, NODE_KEY))
    except IdentityError as exc:
        name = (secret.get("metadata") or {}).get("name", "?")
        raise MaterialError(f"Secret {name!r}: {NODE_KEY} is not an Ed25519 key: {exc}") from exc
