"""The operator in-process against kmock, kopf's Kubernetes API emulator, on loopback.

kmock stores objects and streams watch events but does not run controllers, defaults, CEL or
garbage collection; the tests play the StatefulSet controller by patching ``status`` and read
what the operator wrote. Node admin APIs and governance submissions go through fakes in the
operator's context (the ``nodestatus``/``governance`` seams), not through the network.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
import pytest
from pyrsia_node.genesis import Genesis
from pyrsia_node.ledger import GovernanceAction, GovernanceRecord, decode_record
from pyrsia_operator import governance, handlers, peering
from pyrsia_operator.kube import Connection, Kube
from pyrsia_operator.nodestatus import NodeStatus

pytestmark = [pytest.mark.timeout(60), pytest.mark.looptime]

NS = "pyrsia"
PN = "pyrsia.io/v1alpha1/pyrsianetworks"
AN = "pyrsia.io/v1alpha1/authoritynodes"
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim", "namespaced": True},
    "apps/v1/statefulsets": {"kind": "StatefulSet", "namespaced": True},
    "apps/v1/daemonsets": {"kind": "DaemonSet", "namespaced": True},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "namespaced": True},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True},
    PN: {"kind": "PyrsiaNetwork", "namespaced": True, "subresources": ["status", "scale"]},
    AN: {"kind": "AuthorityNode", "namespaced": True, "subresources": ["status"]},
}
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]


class FakeNodes:
    """Node admin APIs: every node reports ready at a fixed height."""

    def __init__(self) -> None:
        self.height = 7
        self.asked: list[str] = []

    async def __call__(self, name: str, base_url: str) -> NodeStatus:
        self.asked.append(base_url)
        return NodeStatus(name, True, True, node_id="ab" * 32, height=self.height, root="cd" * 32)


class FakeGovernance:
    """Records submitted membership records; rejects while ``reject`` is set."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []
        self.reject = False

    async def __call__(self, base_url: str, record: bytes) -> None:
        if self.reject:
            raise governance.GovernanceRejected(f"{base_url} answered HTTP 404")
        self.records.append((base_url, record))


@pytest.fixture
async def cluster(kmock: Any) -> AsyncIterator[Any]:
    for key, info in RESOURCES.items():
        kmock.resources[key] = {**info, "verbs": VERBS}
    kmock.objects["v1/namespaces", None, NS] = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "resourceVersion": "1"},
    }
    yield kmock


@pytest.fixture
async def kube(cluster: Any) -> AsyncIterator[Kube]:
    client = Kube(Connection(server=str(cluster.url)))
    yield client
    await client.close()


class RunningOperator:
    """The operator's kopf tasks in this loop, until ``stop``."""

    def __init__(self, runner: asyncio.Task[Any], stop: asyncio.Event, ignored: set[Any]):
        self._runner, self._stop, self._ignored = runner, stop, ignored

    async def stop(self) -> None:
        # kopf cancels, on exit, every task created after it started; the task stopping it
        # (e.g. a fixture's teardown) adds itself to the tasks kopf leaves alone.
        current = asyncio.current_task()
        assert current is not None
        self._ignored.add(current)
        self._stop.set()
        await asyncio.wait_for(self._runner, timeout=120)


async def start_operator(
    cluster: Any, nodes: FakeNodes, gov: FakeGovernance, **options: Any
) -> RunningOperator:
    """Start the operator's handlers against ``cluster``; ``options`` go to kopf (peering,
    scope). One login handler function for every test: kopf keys handlers by name, and the
    default registry keeps those of earlier tests."""
    registry = kopf.get_default_registry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(cluster.url), insecure=True)

    ctx = handlers.OperatorContext(Kube(Connection(server=str(cluster.url))), nodes, gov)
    stop = asyncio.Event()
    ignored: set[asyncio.Task[Any]] = set(asyncio.all_tasks())
    tasks = await kopf.spawn_tasks(
        registry=registry, stop_flag=stop, memo=kopf.Memo(ctx=ctx), **options
    )
    runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=ignored))
    ignored.add(runner)
    return RunningOperator(runner, stop, ignored)


@pytest.fixture
async def operator(cluster: Any, kube: Kube) -> AsyncIterator[tuple[FakeNodes, FakeGovernance]]:
    nodes, gov = FakeNodes(), FakeGovernance()
    running = await start_operator(cluster, nodes, gov, standalone=True, clusterwide=True)
    yield nodes, gov
    await running.stop()


def network_body(name: str = "net", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pyrsia.io/v1alpha1",
        "kind": "PyrsiaNetwork",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "chainId": "test-chain",
            "image": "ghcr.io/pyrsia/pyrsia:test",
            "authorities": {"count": 4},
            "peers": {"replicas": 2},
            **spec,
        },
    }


async def eventually(probe: Callable[[], Any], seconds: float = 30, what: str = "condition") -> Any:
    """Poll ``probe`` (sync or async) until it returns something truthy."""
    for _ in range(int(seconds * 10)):
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def posted_events(cluster: Any) -> list[dict[str, Any]]:
    """Events the operator posted (kmock keeps every request; it cannot name generateName
    objects, so only the first Event is stored, but every POST is recorded)."""
    return [
        r.data
        for r in cluster
        if r.method == "POST" and str(r.url.path).endswith("/events") and r.data
    ]


def conditions_of(obj: Any) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


async def mark_ready(kube: Kube, name: str, kind: str = "StatefulSet", ready: int = 1) -> None:
    await kube.patch_status("apps/v1", kind, NS, name, {"readyReplicas": ready})


async def test_network_creates_children_and_becomes_ready(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube, cluster: Any
) -> None:
    nodes, _ = operator
    await kube.create(network_body())

    async def children() -> bool:
        names = [f"net-authority-{i}" for i in range(4)]
        found = [await kube.get("apps/v1", "StatefulSet", NS, n) for n in names]
        return all(found) and await kube.get("v1", "ConfigMap", NS, "net-genesis") is not None

    await eventually(children, what="authority StatefulSets and genesis")
    for api_version, kind, name in [
        ("v1", "Secret", "net-ca"),
        ("v1", "Secret", "net-governance"),
        ("v1", "Secret", "net-authority-0-key"),
        ("v1", "Secret", "net-authority-0-tls"),
        ("v1", "ConfigMap", "net-config"),
        ("v1", "Service", "net-authorities"),
        ("v1", "Service", "net-mirror"),
        ("apps/v1", "StatefulSet", "net-peer"),
        ("policy/v1", "PodDisruptionBudget", "net-authorities"),
        ("networking.k8s.io/v1", "NetworkPolicy", "net-nodes"),
    ]:
        obj = await kube.get(api_version, kind, NS, name)
        assert obj is not None, f"{kind} {name} missing"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("PyrsiaNetwork", "net", "uid-net")

    genesis_cm = await kube.get("v1", "ConfigMap", NS, "net-genesis")
    assert genesis_cm is not None
    genesis = Genesis.from_dict(json.loads(genesis_cm["data"]["genesis.json"]))
    assert [a.name for a in genesis.authorities] == [f"net-authority-{i}" for i in range(4)]
    pdb = await kube.get("policy/v1", "PodDisruptionBudget", NS, "net-authorities")
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1

    async def status_is(ready: str) -> dict[str, Any] | None:
        net = await kube.get("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "net")
        conds = conditions_of(net or {})
        return net if conds.get("Ready", {}).get("status") == ready else None

    net = await eventually(lambda: status_is("False"), what="Ready=False before pods")
    assert conditions_of(net)["Progressing"]["status"] == "True"
    assert conditions_of(net)["QuorumAvailable"]["status"] == "False"

    for i in range(3):
        await mark_ready(kube, f"net-authority-{i}")

    async def quorum() -> bool:
        net = await kube.get("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "net")
        return conditions_of(net or {}).get("QuorumAvailable", {}).get("status") == "True"

    await eventually(quorum, what="QuorumAvailable with 3 of 4")
    await mark_ready(kube, "net-authority-3")
    await mark_ready(kube, "net-peer", ready=2)
    net = await eventually(lambda: status_is("True"), what="Ready=True")
    conds = conditions_of(net)
    assert conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conds.values())
    assert net["status"]["authorities"]["summary"] == "4/4"
    assert net["status"]["peers"]["summary"] == "2/2"

    async def height() -> bool:
        net = await kube.get("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "net")
        return ((net or {}).get("status") or {}).get("ledger", {}).get("height") == 7

    await eventually(height, what="ledger height from the nodes' admin API")
    assert any("net-authority-0-0.net-authorities.pyrsia.svc:7888" in u for u in nodes.asked)

    reasons = {e.get("reason") for e in posted_events(cluster)}
    assert {"GenesisCreated", "QuorumReached", "NetworkReady"} <= reasons


async def test_scaling_peers_updates_the_statefulset(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube
) -> None:
    await kube.create(network_body())
    await eventually(
        lambda: kube.get("apps/v1", "StatefulSet", NS, "net-peer"), what="peer StatefulSet"
    )
    await kube._request(
        "PATCH",
        "/apis/pyrsia.io/v1alpha1/namespaces/pyrsia/pyrsianetworks/net",
        body={"spec": {"peers": {"replicas": 5}}, "metadata": {"generation": 2}},
        content_type="application/merge-patch+json",
    )

    async def scaled() -> bool:
        sts = await kube.get("apps/v1", "StatefulSet", NS, "net-peer")
        return bool(sts and sts["spec"]["replicas"] == 5)

    await eventually(scaled, what="peer StatefulSet scaled to 5")


async def test_invalid_spec_reports_condition_and_event(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube, cluster: Any
) -> None:
    await kube.create(network_body("bad", authorities={"count": 3}))

    async def refused() -> dict[str, Any] | None:
        net = await kube.get("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "bad")
        cond = conditions_of(net or {}).get("Ready", {})
        return cond if cond.get("reason") == "InvalidSpec" else None

    cond = await eventually(refused, what="InvalidSpec condition")
    assert "3 authorities" in cond["message"] and "3f+1" in cond["message"]
    assert await kube.get("apps/v1", "StatefulSet", NS, "bad-authority-0") is None
    warnings = [
        e
        for e in posted_events(cluster)
        if e.get("reason") == "InvalidSpec" and e.get("type") == "Warning"
    ]
    assert warnings and "3f+1" in warnings[0]["message"]


async def test_authority_node_joins_and_leaves_through_governance(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube, cluster: Any
) -> None:
    _, gov = operator
    await kube.create(network_body())
    genesis_cm = await eventually(
        lambda: kube.get("v1", "ConfigMap", NS, "net-genesis"), what="genesis"
    )
    genesis = Genesis.from_dict(json.loads(genesis_cm["data"]["genesis.json"]))
    await kube.create(
        {
            "apiVersion": "pyrsia.io/v1alpha1",
            "kind": "AuthorityNode",
            "metadata": {
                "name": "extra",
                "namespace": NS,
                "uid": "uid-extra",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": {"networkRef": {"name": "net"}, "zone": "zone-a"},
        }
    )
    await eventually(lambda: gov.records, what="add record submitted")
    base_url, record_bytes = gov.records[0]
    assert base_url == "http://net-api.pyrsia.svc:7888"
    record = decode_record(record_bytes)
    assert isinstance(record, GovernanceRecord)
    assert record.action is GovernanceAction.ADD
    assert record.name == "extra"
    assert record.chain_id == "test-chain"
    # Signed by the network's governance key: the network would apply it.
    record.verify(genesis.governance_public_key, genesis.chain_id)
    sts = await eventually(
        lambda: kube.get("apps/v1", "StatefulSet", NS, "extra"), what="extra StatefulSet"
    )
    pod = sts["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "zone-a"}
    node = await kube.get("pyrsia.io/v1alpha1", "AuthorityNode", NS, "extra")
    assert node is not None and node["status"]["membership"] == "Submitted"
    assert await kube.get("v1", "ConfigMap", NS, "net-genesis") == genesis_cm  # untouched

    await kube.delete("pyrsia.io/v1alpha1", "AuthorityNode", NS, "extra")
    await eventually(lambda: len(gov.records) == 2, what="remove record submitted")
    removal = decode_record(gov.records[1][1])
    assert isinstance(removal, GovernanceRecord)
    assert removal.action is GovernanceAction.REMOVE
    assert removal.public_key == record.public_key
    removal.verify(genesis.governance_public_key, genesis.chain_id)

    async def gone() -> bool:
        return await kube.get("pyrsia.io/v1alpha1", "AuthorityNode", NS, "extra") is None

    await eventually(gone, what="finalizer released")
    await eventually(
        lambda: _absent(kube, "apps/v1", "StatefulSet", "extra"), what="StatefulSet pruned"
    )


async def test_rejected_governance_is_reported_not_faked(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube
) -> None:
    _, gov = operator
    gov.reject = True
    await kube.create(network_body())
    await eventually(lambda: kube.get("v1", "ConfigMap", NS, "net-genesis"), what="genesis")
    await kube.create(
        {
            "apiVersion": "pyrsia.io/v1alpha1",
            "kind": "AuthorityNode",
            "metadata": {"name": "extra", "namespace": NS, "uid": "u", "resourceVersion": "1"},
            "spec": {"networkRef": {"name": "net"}},
        }
    )

    async def rejected() -> dict[str, Any] | None:
        node = await kube.get("pyrsia.io/v1alpha1", "AuthorityNode", NS, "extra")
        cond = conditions_of(node or {}).get("Ready", {})
        return cond if cond.get("reason") == "GovernanceRejected" else None

    cond = await eventually(rejected, what="GovernanceRejected condition")
    assert "HTTP 404" in cond["message"]
    node = await kube.get("pyrsia.io/v1alpha1", "AuthorityNode", NS, "extra")
    assert node is not None and node["status"].get("membership", "Pending") == "Pending"


async def _absent(kube: Kube, api_version: str, kind: str, name: str) -> bool:
    return await kube.get(api_version, kind, NS, name) is None


async def test_delete_releases_the_finalizer(
    operator: tuple[FakeNodes, FakeGovernance], kube: Kube
) -> None:
    await kube.create(network_body(pvcRetention="Delete"))

    async def finalized() -> bool:
        net = await kube.get("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "net")
        return handlers.FINALIZER in ((net or {}).get("metadata") or {}).get("finalizers", [])

    await eventually(finalized, what="project finalizer added")
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "data-net-peer-0",
                "namespace": NS,
                "resourceVersion": "1",
                "labels": {"pyrsia.io/network": "net"},
            },
            "spec": {},
        }
    )
    await kube.delete("pyrsia.io/v1alpha1", "PyrsiaNetwork", NS, "net")
    await eventually(
        lambda: _absent(kube, "pyrsia.io/v1alpha1", "PyrsiaNetwork", "net"),
        what="network deleted once the finalizer is released",
    )
    assert await _absent(kube, "v1", "PersistentVolumeClaim", "data-net-peer-0")


# Peering: several operator replicas -------------------------------------------------

PEERING = "pyrsia-operator"
PEERING_RESOURCES: dict[str, dict[str, Any]] = {
    "kopf.dev/v1/clusterkopfpeerings": {"kind": "ClusterKopfPeering", "namespaced": False},
    "kopf.dev/v1/kopfpeerings": {"kind": "KopfPeering", "namespaced": True},
}


async def test_peering_objects_are_created_once(cluster: Any, kube: Kube) -> None:
    for key, info in PEERING_RESOURCES.items():
        cluster.resources[key] = {**info, "verbs": VERBS}
    cluster_wide = f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}"
    assert await peering.ensure_peering(kube, PEERING, []) == [cluster_wide]
    assert await peering.ensure_peering(kube, PEERING, []) == []
    assert await kube.read(cluster_wide) is not None
    in_namespace = f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings/{PEERING}"
    assert await peering.ensure_peering(kube, PEERING, [NS]) == [in_namespace]
    assert (await kube.read(in_namespace) or {})["metadata"]["name"] == PEERING


async def test_a_peered_operator_waits_for_its_peering_object_and_then_acts(
    cluster: Any, kube: Kube
) -> None:
    """kopf with a peering name stays paused until its peering object exists, and never
    creates it: without `ensure_peering` the chart's operator would serve nothing."""
    for key, info in PEERING_RESOURCES.items():
        cluster.resources[key] = {**info, "verbs": VERBS}
    running = await start_operator(
        cluster,
        FakeNodes(),
        FakeGovernance(),
        clusterwide=True,
        peering_name=PEERING,  # as the chart runs it
        priority=peering.random_priority(),
    )
    try:
        await kube.create(network_body())
        await asyncio.sleep(30)
        assert await kube.get("apps/v1", "StatefulSet", NS, "net-authority-0") is None

        await peering.ensure_peering(kube, PEERING, [])

        async def acting() -> bool:
            return await kube.get("apps/v1", "StatefulSet", NS, "net-authority-0") is not None

        await eventually(acting, what="the operator to act once its peering object exists")
    finally:
        await running.stop()
