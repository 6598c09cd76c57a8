"""Kademlia core: XOR distance, k-bucket rules, lookup convergence, provider records."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia.v1 import peer_pb2
from pyrsia_node.dht import (
    Contact,
    InvalidProviderRecord,
    Lookup,
    ProviderStore,
    RoutingTable,
    bucket_index,
    distance,
    node_key,
    sign_provider_record,
    verify_provider_record,
)
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.peering import sign_node_info

keys = st.integers(min_value=0, max_value=2**256 - 1)
CHAIN = "test-chain"


def contact_for(key: int) -> Contact:
    return Contact(f"{key:064x}", f"127.0.0.1:{key % 60000 + 1}", "", "peer", b"")


def genesis() -> Genesis:
    return Genesis(
        chain_id=CHAIN,
        genesis_time="2024-01-01T00:00:00Z",
        governance_public_key=Identity.generate().public_key,
        authorities=(Authority("authority-0", Identity.generate().public_key, "127.0.0.1:1", ""),),
        ca_certificate="",
    )


def signed_info(identity: Identity, address: str = "127.0.0.1:4000") -> peer_pb2.NodeInfo:
    info = peer_pb2.NodeInfo(
        node_id=identity.node_id,
        public_key=identity.public_key,
        role="peer",
        name="p",
        chain_id=CHAIN,
        version="0",
        grpc_address=address,
        timestamp_ms=int(time.time() * 1000),
    )
    return sign_node_info(info, identity)


@given(keys, keys, keys)
def test_xor_distance_is_a_metric(a: int, b: int, c: int) -> None:
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert distance(a, c) <= distance(a, b) + distance(b, c)
    assert (distance(a, b) == 0) == (a == b)


@given(keys, keys, keys)
def test_xor_distance_is_unidirectional(a: int, b: int, c: int) -> None:
    """For a point and a distance there is exactly one other point: lookups converge."""
    if distance(a, b) == distance(a, c):
        assert b == c


@given(keys, keys)
def test_bucket_index_is_the_highest_differing_bit(a: int, b: int) -> None:
    if a == b:
        with pytest.raises(ValueError, match="itself"):
            bucket_index(a, b)
        return
    index = bucket_index(a, b)
    assert 2**index <= distance(a, b) < 2 ** (index + 1)


def test_full_bucket_keeps_old_contacts_and_asks_to_probe_the_oldest() -> None:
    table = RoutingTable(f"{0:064x}", k=2)
    # Keys 4..7 all share bucket 2.
    a, b, c = contact_for(4), contact_for(5), contact_for(6)
    assert table.observe(a) is None
    assert table.observe(b) is None
    assert table.observe(c) == a
    assert [x.node_id for x in table.bucket(2)] == [a.node_id, b.node_id]


def test_seeing_a_contact_again_makes_it_most_recent() -> None:
    table = RoutingTable(f"{0:064x}", k=2)
    a, b, c = contact_for(4), contact_for(5), contact_for(6)
    table.observe(a)
    table.observe(b)
    table.observe(a)
    assert table.observe(c) == b


def test_removing_a_dead_contact_promotes_the_newest_replacement() -> None:
    table = RoutingTable(f"{0:064x}", k=2)
    a, b, c = contact_for(4), contact_for(5), contact_for(6)
    table.observe(a)
    table.observe(b)
    table.observe(c)
    table.remove(a.node_id)
    assert [x.node_id for x in table.bucket(2)] == [b.node_id, c.node_id]


def test_routing_table_never_holds_itself() -> None:
    table = RoutingTable(f"{9:064x}")
    assert table.observe(contact_for(9)) is None
    assert len(table) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(keys, min_size=1, max_size=60, unique=True), keys)
def test_closest_returns_the_k_nearest_by_xor(members: list[int], target: int) -> None:
    table = RoutingTable(f"{2**255 + 12345:064x}", k=20)
    for key in members:
        table.observe(contact_for(key))
    stored = table.contacts()
    expected = sorted(stored, key=lambda c: distance(c.key, target))[:5]
    assert table.closest(target, 5) == expected


def simulate_lookup(
    tables: dict[int, RoutingTable], start: list[int], target: int, k: int, alpha: int, seed: int
) -> tuple[list[int], int]:
    """Drive a Lookup against an in-memory network; answers arrive in random order."""
    rng = random.Random(seed)
    lookup = Lookup(target, [contact_for(n) for n in start], f"{2**256 - 1:064x}", k, alpha)
    in_flight: list[Contact] = []
    max_in_flight = 0
    while not lookup.finished:
        in_flight += lookup.next_queries()
        max_in_flight = max(max_in_flight, len(in_flight))
        assert in_flight, "lookup neither finished nor querying"
        answered = in_flight.pop(rng.randrange(len(in_flight)))
        lookup.on_response(answered.node_id, tables[answered.key].closest(target, k))
    return [c.key for c in lookup.closest()], max_in_flight


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=4))
def test_lookup_converges_to_the_true_k_closest(seed: int, alpha: int) -> None:
    """Every node's routing table saw every other node, in random order, with k-buckets."""
    rng = random.Random(seed)
    members = rng.sample(range(2**16), 60)
    k = 4
    tables = {}
    for n in members:
        tables[n] = RoutingTable(f"{n:064x}", k)
        for m in rng.sample(members, len(members)):
            tables[n].observe(contact_for(m))
    target = rng.randrange(2**16)
    found, max_in_flight = simulate_lookup(tables, rng.sample(members, 2), target, k, alpha, seed)
    assert found == sorted(members, key=lambda m: m ^ target)[:k]
    assert max_in_flight <= alpha


def test_lookup_skips_failed_nodes_and_finishes() -> None:
    lookup = Lookup(0, [contact_for(1), contact_for(2)], f"{99:064x}", k=2, alpha=2)
    first, second = lookup.next_queries()
    lookup.on_failure(first.node_id)
    lookup.on_response(second.node_id, [contact_for(3)])
    (third,) = lookup.next_queries()
    assert third.key == 3
    lookup.on_response(third.node_id, [])
    assert lookup.finished
    assert [c.key for c in lookup.closest()] == [2, 3]


class FakeWallClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def test_signed_provider_record_verifies_and_binds_address() -> None:
    provider = Identity.generate()
    now = int(time.time() * 1000)
    record = sign_provider_record(
        provider, CHAIN, "sha256:" + "a" * 64, signed_info(provider, "127.0.0.1:7777"), now, 60
    )
    entry = verify_provider_record(record, genesis(), now)
    assert entry.provider.node_id == provider.node_id
    assert entry.provider.grpc_address == "127.0.0.1:7777"
    assert entry.expires_ms == now + 60_000


def test_provider_claiming_the_authority_role_needs_a_key_in_force() -> None:
    """An authority added by governance provides as an authority once it is in force; before
    (and for a key never added) its provider records are refused."""
    added = Identity.generate()
    now = int(time.time() * 1000)
    info = signed_info(added)
    info.role = "authority"
    record = sign_provider_record(
        added, CHAIN, "sha256:" + "a" * 64, sign_node_info(info, added), now, 60
    )
    with pytest.raises(InvalidProviderRecord, match="authority role"):
        verify_provider_record(record, genesis(), now)
    entry = verify_provider_record(record, genesis(), now, {added.node_id}.__contains__)
    assert entry.provider.role == "authority"


def test_record_announcing_someone_else_is_rejected() -> None:
    victim, liar = Identity.generate(), Identity.generate()
    now = int(time.time() * 1000)
    record = sign_provider_record(liar, CHAIN, "sha256:" + "a" * 64, signed_info(victim), now, 60)
    with pytest.raises(InvalidProviderRecord, match="not signed by its provider"):
        verify_provider_record(record, genesis(), now)


def test_record_with_an_address_the_provider_did_not_sign_is_rejected() -> None:
    provider = Identity.generate()
    now = int(time.time() * 1000)
    record = sign_provider_record(
        provider, CHAIN, "sha256:" + "a" * 64, signed_info(provider), now, 60
    )
    record.provider.grpc_address = "10.0.0.66:44000"
    with pytest.raises(InvalidProviderRecord, match="signature"):
        verify_provider_record(record, genesis(), now)


def test_expired_record_is_rejected() -> None:
    provider = Identity.generate()
    now = int(time.time() * 1000)
    record = sign_provider_record(
        provider, CHAIN, "sha256:" + "a" * 64, signed_info(provider), now - 61_000, 60
    )
    with pytest.raises(InvalidProviderRecord, match="expired"):
        verify_provider_record(record, genesis(), now)


def test_provider_store_forgets_records_when_they_expire() -> None:
    clock = FakeWallClock(int(time.time() * 1000))
    store = ProviderStore(clock)
    digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
    provider = Identity.generate()
    record = sign_provider_record(provider, CHAIN, digest, signed_info(provider), clock(), 10)
    store.add(digest, verify_provider_record(record, genesis(), clock()))
    clock.now_ms += 9_999
    assert [e.provider.node_id for e in store.get(digest)] == [provider.node_id]
    clock.now_ms += 1
    assert store.get(digest) == []
    assert store.expire() == 1


def test_republished_record_extends_expiry() -> None:
    clock = FakeWallClock(int(time.time() * 1000))
    store = ProviderStore(clock)
    digest = "sha256:" + "b" * 64
    provider = Identity.generate()
    first = sign_provider_record(provider, CHAIN, digest, signed_info(provider), clock(), 10)
    store.add(digest, verify_provider_record(first, genesis(), clock()))
    clock.now_ms += 8_000
    second = sign_provider_record(provider, CHAIN, digest, signed_info(provider), clock(), 10)
    store.add(digest, verify_provider_record(second, genesis(), clock()))
    clock.now_ms += 8_000
    assert len(store.get(digest)) == 1


def test_node_key_rejects_short_ids() -> None:
    with pytest.raises(ValueError, match="64 hex"):
        node_key("abc")
