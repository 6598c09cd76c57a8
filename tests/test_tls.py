"""Mutual TLS between nodes: only holders of a certificate from the network CA get in."""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import free_port_block
from pyrsia.v1 import peer_pb2, peer_pb2_grpc
from pyrsia_node import config, tls
from pyrsia_node.genesis import LocalNetwork, create_network
from pyrsia_node.server import Node


@pytest.fixture
def network(tmp_path: Path) -> LocalNetwork:
    return create_network(tmp_path, authorities=1, peers=0, base_port=free_port_block(3))


@pytest.fixture
async def node(network: LocalNetwork) -> AsyncIterator[Node]:
    running = Node(config.load(network.nodes[0].config_file, environ={}))
    await running.start()
    yield running
    await running.stop()


async def ping(address: str, credentials: grpc.ChannelCredentials) -> peer_pb2.PingResponse:
    options = [("grpc.ssl_target_name_override", tls.TARGET_NAME)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        return await stub.Ping(peer_pb2.PingRequest(node_id="tester", nonce=7), timeout=5)


def client_credentials(ca_pem: bytes, pair: tls.KeyPair | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.ssl_channel_credentials(ca_pem, pair.key_pem, pair.cert_pem)


def network_ca(network: LocalNetwork) -> tls.KeyPair:
    ca_dir = network.root / "ca"
    return tls.KeyPair((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())


async def test_client_with_network_certificate_is_served(network: LocalNetwork, node: Node) -> None:
    ca = network_ca(network)
    client = tls.issue_node_certificate(ca, "client")
    reply = await ping(node.config.grpc_address, client_credentials(ca.cert_pem, client))
    assert reply.nonce == 7
    assert reply.node_id == node.identity.node_id


async def test_client_without_certificate_is_refused(network: LocalNetwork, node: Node) -> None:
    ca = network_ca(network)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ping(node.config.grpc_address, client_credentials(ca.cert_pem, None))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_with_foreign_ca_certificate_is_refused(
    network: LocalNetwork, node: Node
) -> None:
    foreign = tls.create_ca("other-network")
    intruder = tls.issue_node_certificate(foreign, "intruder")
    credentials = client_credentials(network_ca(network).cert_pem, intruder)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ping(node.config.grpc_address, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_with_foreign_certificate_is_not_trusted(
    network: LocalNetwork, node: Node
) -> None:
    """A client that trusts only another CA refuses our node: trust is per network."""
    foreign = tls.create_ca("other-network")
    credentials = client_credentials(foreign.cert_pem, tls.issue_node_certificate(foreign, "c"))
    with pytest.raises(grpc.aio.AioRpcError):
        await ping(node.config.grpc_address, credentials)
