from pathlib import Path

import pytest
from pyrsia.v1 import peer_pb2
from pyrsia_node.genesis import Genesis, create_network
from pyrsia_node.identity import Identity
from pyrsia_node.peering import (
    MAX_CLOCK_SKEW_MS,
    InvalidNodeInfo,
    PeerTable,
    sign_node_info,
    verify_node_info,
)

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def genesis(tmp_path_factory: pytest.TempPathFactory) -> Genesis:
    return create_network(tmp_path_factory.mktemp("net"), authorities=1, peers=0).genesis


def info_for(identity: Identity, genesis: Genesis, role: str = "peer") -> peer_pb2.NodeInfo:
    info = peer_pb2.NodeInfo(
        node_id=identity.node_id,
        public_key=identity.public_key,
        role=role,
        name="n",
        chain_id=genesis.chain_id,
        grpc_address="127.0.0.1:1",
        timestamp_ms=NOW_MS,
    )
    return sign_node_info(info, identity)


def test_signed_info_is_accepted(genesis: Genesis) -> None:
    verify_node_info(info_for(Identity.generate(), genesis), genesis, NOW_MS, True)


def test_authority_with_genesis_key_is_accepted(tmp_path: Path) -> None:
    network = create_network(tmp_path, authorities=1, peers=0)
    key = Identity.from_pem((network.nodes[0].data_dir / "keys" / "node.key").read_bytes())
    info = info_for(key, network.genesis, role="authority")
    verify_node_info(info, network.genesis, NOW_MS, True)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda i: setattr(i, "grpc_address", "10.0.0.1:1"), "bad signature"),
        (lambda i: setattr(i, "node_id", "0" * 64), "does not match its public key"),
        (lambda i: setattr(i, "chain_id", "other"), "chain id"),
        (lambda i: setattr(i, "signature", b"\0" * 64), "bad signature"),
    ],
)
def test_tampered_info_is_rejected(genesis: Genesis, tamper: object, reason: str) -> None:
    info = info_for(Identity.generate(), genesis)
    tamper(info)  # type: ignore[operator]
    with pytest.raises(InvalidNodeInfo, match=reason):
        verify_node_info(info, genesis, NOW_MS, True)


def test_authority_claim_without_genesis_key_is_rejected(genesis: Genesis) -> None:
    info = info_for(Identity.generate(), genesis, role="authority")
    with pytest.raises(InvalidNodeInfo, match="authority role"):
        verify_node_info(info, genesis, NOW_MS, True)


def test_stale_info_is_rejected_only_when_freshness_matters(genesis: Genesis) -> None:
    info = info_for(Identity.generate(), genesis)
    later = NOW_MS + MAX_CLOCK_SKEW_MS + 1
    with pytest.raises(InvalidNodeInfo, match="stale"):
        verify_node_info(info, genesis, later, True)
    verify_node_info(info, genesis, later, False)


def test_peer_table_forgets_silent_peers(genesis: Genesis) -> None:
    now = [0.0]
    table = PeerTable("self", stale_after=5.0, clock=lambda: now[0])
    info = info_for(Identity.generate(), genesis)
    table.seen(info)
    assert table.connected() == [info]
    now[0] = 6.0
    assert table.connected() == []
    table.touch(info.node_id)
    assert table.connected() == [info]


def test_relayed_info_is_known_but_not_connected(genesis: Genesis) -> None:
    table = PeerTable("self", stale_after=5.0, clock=lambda: 0.0)
    info = info_for(Identity.generate(), genesis)
    table.known(info)
    assert table.connected() == []
    assert table.all() == [info]


def test_authority_claim_follows_the_authorities_in_force(tmp_path: Path) -> None:
    """An authority added by governance is accepted once the node's ledger has it in force;
    a genesis authority removed by governance no longer is."""
    network = create_network(tmp_path, authorities=1, peers=0)
    genesis = network.genesis
    founder = Identity.from_pem((network.nodes[0].data_dir / "keys" / "node.key").read_bytes())
    added = Identity.generate()
    in_force = {added.node_id}
    verify_node_info(
        info_for(added, genesis, "authority"), genesis, NOW_MS, True, in_force.__contains__
    )
    with pytest.raises(InvalidNodeInfo, match="authority role"):
        verify_node_info(
            info_for(founder, genesis, "authority"), genesis, NOW_MS, True, in_force.__contains__
        )
    with pytest.raises(InvalidNodeInfo, match="authority role"):
        verify_node_info(info_for(added, genesis, "authority"), genesis, NOW_MS, True)
