"""kopf handlers: observe, diff against the builders' objects, apply, report.

All decisions of substance live in pure modules (``spec``, ``builders``, ``rollout``,
``conditions``, ``governance``); this module reads the cluster, calls them, writes what they
return and reports through ``.status`` and Events. It never edits a file under a running
node: membership changes go to the network as governance records.

Importing the module registers the handlers in kopf's default registry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from pyrsia_node import tls
from pyrsia_node.genesis import Genesis, GenesisError, quorum
from pyrsia_node.identity import Identity

from pyrsia_operator import builders, conditions, governance, material, metrics, rollout
from pyrsia_operator.builders import (
    API_VERSION,
    LABEL_AUTHORITY,
    LABEL_NETWORK,
    AuthorityMaterial,
    Owner,
)
from pyrsia_operator.kube import Connection, Kube
from pyrsia_operator.nodestatus import HttpNodeStatusSource, NodeStatus, NodeStatusSource
from pyrsia_operator.spec import (
    AuthoritySpec,
    NetworkSpec,
    SpecError,
    check_immutable,
    counted_authority,
    parse_authority,
    parse_network,
)

FINALIZER = "pyrsia.io/finalizer"
NETWORKS = ("pyrsia.io", "v1alpha1", "pyrsianetworks")
AUTHORITY_NODES = ("pyrsia.io", "v1alpha1", "authoritynodes")
MANAGED_BY = {"app.kubernetes.io/managed-by": "pyrsia-operator"}
RECONCILE_INTERVAL = 20.0
PRUNED_KINDS = (
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
MEMBER_STATES = ("Genesis", "Submitted", "Member")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class OperatorContext:
    """Everything handlers use to reach the outside world; tests substitute any part."""

    kube: Kube
    node_status: NodeStatusSource
    submit_governance: governance.GovernanceSubmitter
    clock: Callable[[], dt.datetime] = _now
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> OperatorContext:
        return cls(
            Kube(Connection.from_environment()),
            HttpNodeStatusSource(),
            governance.HttpGovernanceSubmitter(),
        )

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault((namespace, name), asyncio.Lock())

    def timestamp(self) -> str:
        return self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")


class WaitingFor(kopf.TemporaryError):
    """Something the reconciliation needs is not there yet; retried after ``delay``."""


def _event(body: Mapping[str, Any], type: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event about ``body`` (queued; kopf posts it in the background)."""
    kopf.event(cast(Any, body), type=type, reason=reason, message=message[:1000])


def _ctx(memo: Any) -> OperatorContext:
    context: OperatorContext = memo.ctx
    return context


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    if getattr(memo, "ctx", None) is None:
        memo.ctx = OperatorContext.from_environment()


@kopf.on.cleanup()
async def close_clients(memo: Any, **_: Any) -> None:
    ctx = _ctx(memo)
    await ctx.kube.close()
    for resource in (ctx.node_status, ctx.submit_governance):
        close = getattr(resource, "close", None)
        if close is not None:
            await close()


# ---------------------------------------------------------------- PyrsiaNetwork


def _owner(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(body.get("kind", "PyrsiaNetwork"), meta["name"], meta.get("uid", ""))


async def _network_keys(ctx: OperatorContext, net: NetworkSpec) -> material.NetworkKeys:
    ca = await ctx.kube.get("v1", "Secret", net.namespace, f"{net.name}-ca")
    gov = await ctx.kube.get("v1", "Secret", net.namespace, f"{net.name}-governance")
    if ca is None and gov is None:
        return material.generate_network_keys(net.chain_id)
    if ca is None or gov is None:
        raise material.MaterialError(
            f"only one of Secrets {net.name}-ca and {net.name}-governance exists; restore the "
            "missing one from backup (regenerating it would split the network)"
        )
    return material.network_keys_from_secrets(ca, gov)


async def _tls_pair(
    ctx: OperatorContext,
    namespace: str,
    secret: str,
    ca: tls.KeyPair,
    cn: str,
    hosts: tuple[str, ...],
) -> tls.KeyPair:
    existing = await ctx.kube.get("v1", "Secret", namespace, secret)
    if existing is not None:
        return tls.KeyPair(
            material.secret_bytes(existing, material.TLS_KEY),
            material.secret_bytes(existing, material.TLS_CERT),
        )
    return tls.issue_node_certificate(ca, cn, hosts)


@dataclass(frozen=True, slots=True)
class AuthorityView:
    spec: AuthoritySpec
    membership: str  # Genesis, Pending, Submitted, Member, Removing


async def _authority_views(
    ctx: OperatorContext, net: NetworkSpec, genesis_names: tuple[str, ...]
) -> list[AuthorityView]:
    """Authorities to run: counted ones, then AuthorityNodes that reference the network."""
    views: list[AuthorityView] = []
    if net.authority_count is not None:
        views = [
            AuthorityView(counted_authority(net, i), "Genesis") for i in range(net.authority_count)
        ]
    nodes = await ctx.kube.list(API_VERSION, "AuthorityNode", net.namespace)
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        if ((node.get("spec") or {}).get("networkRef") or {}).get("name") != net.name:
            continue
        name = node["metadata"]["name"]
        try:
            spec = parse_authority(name, node.get("spec") or {})
        except SpecError:
            continue  # reported on the AuthorityNode itself
        state = (
            "Genesis"
            if name in genesis_names
            else (node.get("status") or {}).get("membership", "Pending")
        )
        if node["metadata"].get("deletionTimestamp") and state != "Genesis":
            state = "Removing"
        views.append(AuthorityView(spec, state))
    return views


async def _identity(
    ctx: OperatorContext, net: NetworkSpec, authority: AuthoritySpec
) -> tuple[Identity, bool]:
    """The authority's key and whether this network renders its Secret."""
    secret = await ctx.kube.get("v1", "Secret", net.namespace, authority.key_secret)
    if secret is not None:
        return material.node_identity_from_secret(secret), not authority.from_resource
    if authority.from_resource:
        raise WaitingFor(
            f"waiting for Secret {authority.key_secret} of AuthorityNode {authority.name}",
            delay=5,
        )
    return Identity.generate(), True


async def reconcile_network(
    ctx: OperatorContext, body: Mapping[str, Any], gather_nodes: bool
) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = int(meta.get("generation") or 0)
    async with ctx.lock(namespace, name), metrics.reconciling("PyrsiaNetwork"):
        # Re-read under the lock: a handler and the timer may both hold an older body.
        fresh = await ctx.kube.get(API_VERSION, "PyrsiaNetwork", namespace, name)
        if fresh is None:
            return
        body = fresh
        status = dict(body.get("status") or {})
        try:
            net = parse_network(name, namespace, body.get("spec") or {})
            recorded_chain = status.get("chainId")
            if recorded_chain and recorded_chain != net.chain_id:
                check_immutable({"chainId": recorded_chain}, {"chainId": net.chain_id})
        except SpecError as exc:
            await _report_invalid(ctx, body, status, generation, str(exc))
            return
        try:
            observation, genesis = await _apply_network(ctx, body, net, status)
        except (material.MaterialError, GenesisError) as exc:
            await _report_invalid(ctx, body, status, generation, str(exc))
            return
        if gather_nodes:
            await _gather_nodes(ctx, net, genesis, status)
        await _write_status(ctx, body, status, generation, observation)


async def _apply_network(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    net: NetworkSpec,
    status: dict[str, Any],
) -> tuple[conditions.NetworkObservation, Genesis]:
    kube, owner = ctx.kube, _owner(body)
    keys = await _network_keys(ctx, net)
    genesis_cm = await kube.get("v1", "ConfigMap", net.namespace, f"{net.name}-genesis")
    existing_genesis = (
        Genesis.from_dict(json.loads(genesis_cm["data"]["genesis.json"])) if genesis_cm else None
    )
    genesis_names = (
        tuple(a.name for a in existing_genesis.authorities)
        if existing_genesis
        else net.genesis_authority_names()
    )
    views = await _authority_views(ctx, net, genesis_names)
    present = {v.spec.name for v in views}
    if existing_genesis is None:
        missing = [n for n in genesis_names if n not in present]
        if missing:
            raise WaitingFor(f"waiting for AuthorityNode(s) {', '.join(missing)}", delay=10)
    auth_material: list[AuthorityMaterial] = []
    for view in views:
        identity, managed = await _identity(ctx, net, view.spec)
        pair = await _tls_pair(
            ctx,
            net.namespace,
            f"{view.spec.name}-tls",
            keys.ca,
            view.spec.name,
            builders.authority_hosts(net, view.spec),
        )
        auth_material.append(AuthorityMaterial(view.spec, identity, pair, managed))
    genesis = existing_genesis or builders.desired_genesis(
        net,
        [(m.spec, m.identity.public_key) for m in auth_material if m.spec.name in genesis_names],
        keys,
        ctx.timestamp(),
    )
    peer_tls = await _tls_pair(
        ctx, net.namespace, f"{net.name}-peer-tls", keys.ca, f"{net.name}-peer", ()
    )
    member_names = {v.spec.name for v in views if v.membership in MEMBER_STATES}
    members = max(len(member_names), 1)
    monitor_served = net.service_monitor and await kube.group_version_served(
        "monitoring.coreos.com/v1"
    )
    desired = builders.desired_objects(
        net, owner, genesis, keys, peer_tls, auth_material, members, monitor_served
    )

    statefulsets = {
        o["metadata"]["name"]: o
        for o in await kube.list("apps/v1", "StatefulSet", net.namespace, {LABEL_NETWORK: net.name})
    }
    wanted_hashes = {
        o["metadata"]["name"]: o["metadata"]["annotations"][builders.TEMPLATE_HASH]
        for o in desired
        if o["kind"] == "StatefulSet" and LABEL_AUTHORITY in o["metadata"]["labels"]
    }
    observed = {n: rollout.observe(s) for n, s in statefulsets.items() if n in wanted_hashes}
    plan = rollout.plan_authority_rollout(wanted_hashes, observed, members)
    for obj in desired:
        obj_name = obj["metadata"]["name"]
        if (
            obj_name in wanted_hashes
            and obj["kind"] == "StatefulSet"
            and obj_name not in plan.apply
        ):
            continue
        await kube.apply(obj)
    if genesis_cm is None:
        _event(
            body,
            type="Normal",
            reason="GenesisCreated",
            message=f"genesis {genesis.genesis_hash[:16]} with {len(genesis.authorities)} "
            f"authorities for chain {genesis.chain_id}",
        )
    await _prune(ctx, net, desired, monitor_served)

    authorities_ready = sum(1 for n in member_names if n in observed and observed[n].ready)
    peers_desired, peers_ready = await _peer_counts(ctx, net)
    status["chainId"] = net.chain_id
    status["genesisHash"] = genesis.genesis_hash
    status["authorities"] = {
        "members": members,
        "ready": authorities_ready,
        "quorum": quorum(members),
        "summary": f"{authorities_ready}/{members}",
    }
    status["peers"] = {
        "replicas": peers_ready,
        "ready": peers_ready,
        "selector": builders.selector_string(net, "peer"),
        "summary": f"{peers_ready}/{peers_desired}",
    }
    previous = {c.get("type"): c for c in status.get("conditions") or []}
    was_ready = (
        previous.get(conditions.READY, {}).get("status") == "True"
        or previous.get(conditions.DEGRADED, {}).get("reason") == "AuthoritiesDown"
    )
    observation = conditions.NetworkObservation(
        members=members,
        authorities_ready=authorities_ready,
        peers_desired=peers_desired,
        peers_ready=peers_ready,
        rollout_pending=plan.reason if plan.waiting else "",
        was_ready=was_ready,
    )
    return observation, genesis


async def _peer_counts(ctx: OperatorContext, net: NetworkSpec) -> tuple[int, int]:
    kind = net.peers.mode
    workload = await ctx.kube.get("apps/v1", kind, net.namespace, f"{net.name}-peer")
    workload_status = (workload or {}).get("status") or {}
    if kind == "DaemonSet":
        return (
            int(workload_status.get("desiredNumberScheduled") or 0),
            int(workload_status.get("numberReady") or 0),
        )
    return net.peers.replicas, int(workload_status.get("readyReplicas") or 0)


async def _prune(
    ctx: OperatorContext, net: NetworkSpec, desired: list[dict[str, Any]], monitor_served: bool
) -> None:
    """Delete objects of this network that the desired set no longer contains."""
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in desired}
    kinds = list(PRUNED_KINDS)
    if monitor_served or await ctx.kube.group_version_served("monitoring.coreos.com/v1"):
        kinds.append(("monitoring.coreos.com/v1", "ServiceMonitor"))
    for api_version, kind in kinds:
        found = await ctx.kube.list(
            api_version, kind, net.namespace, {LABEL_NETWORK: net.name, **MANAGED_BY}
        )
        for obj in found:
            obj_name = obj["metadata"]["name"]
            if (api_version, kind, obj_name) not in wanted:
                await ctx.kube.delete(api_version, kind, net.namespace, obj_name)


async def _gather_nodes(
    ctx: OperatorContext, net: NetworkSpec, genesis: Genesis, status: dict[str, Any]
) -> None:
    """Per-node readiness and the ledger height from every authority's admin API."""
    names = [a.name for a in genesis.authorities]
    views = await _authority_views(ctx, net, tuple(names))
    targets = {v.spec.name: v.spec for v in views}
    results: list[NodeStatus] = await asyncio.gather(
        *(
            ctx.node_status(n, f"http://{builders.authority_pod_host(net, s)}:{builders.HTTP_PORT}")
            for n, s in targets.items()
        )
    )
    status["nodes"] = [r.to_status("authority") for r in results]
    heights = [r.height for r in results if r.height is not None and r.ready]
    ledger = dict(status.get("ledger") or {})
    if heights:
        height = max(heights)
        if ledger.get("height") != height:
            ledger["lastHeightChange"] = ctx.timestamp()
        ledger["height"] = height
        root = next((r.root for r in results if r.height == height and r.root), "")
        if root:
            ledger["root"] = root
    status["ledger"] = ledger


async def _write_status(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    status: dict[str, Any],
    generation: int,
    observation: conditions.NetworkObservation,
) -> None:
    merged, changed = conditions.merge_conditions(
        status.get("conditions") or [],
        conditions.network_conditions(observation),
        generation,
        ctx.timestamp(),
    )
    status["conditions"] = merged
    status["observedGeneration"] = generation
    for cond in changed:
        bad = (
            cond.status == "True"
            if cond.type == conditions.DEGRADED
            else cond.type in (conditions.READY, conditions.QUORUM) and cond.status == "False"
        )
        _event(
            body,
            type="Warning" if bad else "Normal",
            reason=cond.reason,
            message=f"{cond.type}={cond.status}: {cond.message}",
        )
    meta = body["metadata"]
    await ctx.kube.patch_status(
        API_VERSION, "PyrsiaNetwork", meta["namespace"], meta["name"], status
    )


async def _report_invalid(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    status: dict[str, Any],
    generation: int,
    message: str,
) -> None:
    previous = {c.get("type"): c for c in status.get("conditions") or []}
    if previous.get(conditions.READY, {}).get("message") != message:
        _event(body, type="Warning", reason="InvalidSpec", message=message)
    await _write_status(
        ctx, body, status, generation, conditions.NetworkObservation(0, 0, 0, 0, spec_error=message)
    )


@kopf.on.resume(*NETWORKS)
@kopf.on.create(*NETWORKS)
@kopf.on.update(*NETWORKS, field="spec")
async def network_changed(body: kopf.Body, memo: Any, **_: Any) -> None:
    await reconcile_network(_ctx(memo), body, gather_nodes=False)


@kopf.timer(*NETWORKS, interval=RECONCILE_INTERVAL, initial_delay=1.0)
async def network_timer(body: kopf.Body, memo: Any, **_: Any) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return
    await reconcile_network(_ctx(memo), body, gather_nodes=True)


@kopf.on.delete(*NETWORKS)
async def network_deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Owned objects go with the network (ownerReferences); volumes only when asked."""
    ctx = _ctx(memo)
    meta, spec = body["metadata"], body.get("spec") or {}
    if spec.get("pvcRetention", "Retain") != "Delete":
        return
    claims = await ctx.kube.list(
        "v1", "PersistentVolumeClaim", meta["namespace"], {LABEL_NETWORK: meta["name"]}
    )
    for claim in claims:
        await ctx.kube.delete(
            "v1", "PersistentVolumeClaim", meta["namespace"], claim["metadata"]["name"]
        )
    _event(
        body,
        type="Normal",
        reason="VolumesDeleted",
        message=f"deleted {len(claims)} PersistentVolumeClaim(s) (pvcRetention=Delete)",
    )


# ---------------------------------------------------------------- AuthorityNode


async def _node_context(
    ctx: OperatorContext, namespace: str, authority: AuthoritySpec
) -> tuple[NetworkSpec, Genesis]:
    network = await ctx.kube.get(API_VERSION, "PyrsiaNetwork", namespace, authority.network)
    if network is None:
        raise WaitingFor(f"PyrsiaNetwork {authority.network} not found in {namespace}", delay=30)
    net = parse_network(authority.network, namespace, network.get("spec") or {})
    genesis_cm = await ctx.kube.get("v1", "ConfigMap", namespace, f"{net.name}-genesis")
    if genesis_cm is None:
        raise WaitingFor(f"PyrsiaNetwork {net.name} has no genesis yet", delay=10)
    return net, Genesis.from_dict(json.loads(genesis_cm["data"]["genesis.json"]))


async def _submit_change(
    ctx: OperatorContext,
    net: NetworkSpec,
    change: governance.MembershipChange,
) -> None:
    gov = await ctx.kube.get("v1", "Secret", net.namespace, f"{net.name}-governance")
    if gov is None:
        raise WaitingFor(f"Secret {net.name}-governance not found", delay=30)
    identity = Identity.from_pem(material.secret_bytes(gov, material.GOVERNANCE_KEY))
    record = governance.change_record(change, identity)
    base_url = f"http://{net.name}-api.{net.namespace}.svc:{builders.HTTP_PORT}"
    try:
        await ctx.submit_governance(base_url, record)
    except governance.GovernanceRejected:
        metrics.GOVERNANCE_SUBMISSIONS.labels(change.action, "rejected").inc()
        raise
    metrics.GOVERNANCE_SUBMISSIONS.labels(change.action, "accepted").inc()


def _authority_conditions(
    status: Mapping[str, Any], generation: int, now: str, ready: bool, reason: str, message: str
) -> list[dict[str, Any]]:
    merged, _ = conditions.merge_conditions(
        status.get("conditions") or [],
        [conditions.Condition(conditions.READY, "True" if ready else "False", reason, message)],
        generation,
        now,
    )
    return merged


async def reconcile_authority_node(ctx: OperatorContext, body: Mapping[str, Any]) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    async with metrics.reconciling("AuthorityNode"):
        try:
            authority = parse_authority(name, body.get("spec") or {})
        except SpecError as exc:
            await _authority_status(ctx, body, status, generation, False, "InvalidSpec", str(exc))
            _event(body, type="Warning", reason="InvalidSpec", message=str(exc))
            return
        identity = await _ensure_key(ctx, body, authority)
        status["nodeId"] = identity.node_id
        try:
            net, genesis = await _node_context(ctx, namespace, authority)
        except WaitingFor as exc:
            await _authority_status(
                ctx, body, status, generation, False, "WaitingForNetwork", str(exc)
            )
            raise
        membership = status.get("membership", "Pending")
        if any(a.name == name for a in genesis.authorities):
            membership = "Genesis"
        elif membership == "Pending":
            change = governance.MembershipChange(
                "add",
                net.chain_id,
                builders.genesis_authority(net, authority, identity.public_key),
                governance.sequence_from_timestamp(meta.get("creationTimestamp")),
            )
            try:
                await _submit_change(ctx, net, change)
            except governance.GovernanceRejected as exc:
                message = f"governance record to add {name} not accepted: {exc}"
                await _authority_status(
                    ctx, body, status, generation, False, "GovernanceRejected", message
                )
                _event(body, type="Warning", reason="GovernanceRejected", message=message)
                raise kopf.TemporaryError(message, delay=60) from exc
            membership = "Submitted"
            _event(
                body,
                type="Normal",
                reason="GovernanceSubmitted",
                message=f"add-authority record for {name} submitted to {net.name}",
            )
        status["membership"] = membership
        sts = await ctx.kube.get("apps/v1", "StatefulSet", namespace, name)
        ready = rollout.observe(sts).ready if sts is not None else False
        await _authority_status(
            ctx,
            body,
            status,
            generation,
            ready,
            "NodeReady" if ready else "NodeNotReady",
            f"membership {membership}; pod {'ready' if ready else 'not ready'}",
        )


async def _ensure_key(
    ctx: OperatorContext, body: Mapping[str, Any], authority: AuthoritySpec
) -> Identity:
    namespace = body["metadata"]["namespace"]
    secret = await ctx.kube.get("v1", "Secret", namespace, authority.key_secret)
    if secret is not None:
        return material.node_identity_from_secret(secret)
    identity = Identity.generate()
    owner = Owner("AuthorityNode", authority.name, body["metadata"].get("uid", ""))
    await ctx.kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": authority.key_secret,
                "namespace": namespace,
                "labels": {LABEL_AUTHORITY: authority.name, **MANAGED_BY},
                "ownerReferences": [owner.reference()],
            },
            "data": material.encode_data({material.NODE_KEY: identity.private_pem()}),
        }
    )
    _event(
        body,
        type="Normal",
        reason="KeyGenerated",
        message=f"generated node key in Secret {authority.key_secret} "
        f"(node id {identity.node_id[:16]})",
    )
    return identity


async def _authority_status(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    status: dict[str, Any],
    generation: int,
    ready: bool,
    reason: str,
    message: str,
) -> None:
    status["conditions"] = _authority_conditions(
        status, generation, ctx.timestamp(), ready, reason, message
    )
    status["observedGeneration"] = generation
    meta = body["metadata"]
    await ctx.kube.patch_status(
        API_VERSION, "AuthorityNode", meta["namespace"], meta["name"], status
    )


@kopf.on.resume(*AUTHORITY_NODES)
@kopf.on.create(*AUTHORITY_NODES)
@kopf.on.update(*AUTHORITY_NODES, field="spec")
async def authority_node_changed(body: kopf.Body, memo: Any, **_: Any) -> None:
    await reconcile_authority_node(_ctx(memo), body)


@kopf.timer(*AUTHORITY_NODES, interval=RECONCILE_INTERVAL * 3, initial_delay=RECONCILE_INTERVAL)
async def authority_node_timer(body: kopf.Body, memo: Any, **_: Any) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return
    await reconcile_authority_node(_ctx(memo), body)


@kopf.on.delete(*AUTHORITY_NODES)
async def authority_node_deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    """A member leaves through a governance record; the finalizer holds until it is taken."""
    ctx = _ctx(memo)
    meta, status = body["metadata"], body.get("status") or {}
    if status.get("membership") not in MEMBER_STATES:
        return  # never joined: nothing to tell the network
    try:
        authority = parse_authority(meta["name"], body.get("spec") or {})
        net, genesis = await _node_context(ctx, meta["namespace"], authority)
    except (SpecError, WaitingFor):
        return  # the network is gone or unusable: no one to tell
    key = await ctx.kube.get("v1", "Secret", meta["namespace"], authority.key_secret)
    if key is None:
        raise kopf.PermanentError(
            f"Secret {authority.key_secret} is gone, so the removal record cannot name the key"
        )
    identity = material.node_identity_from_secret(key)
    change = governance.MembershipChange(
        "remove",
        genesis.chain_id,
        builders.genesis_authority(net, authority, identity.public_key),
        governance.sequence_from_timestamp(meta.get("deletionTimestamp")),
    )
    try:
        await _submit_change(ctx, net, change)
    except governance.GovernanceRejected as exc:
        message = (
            f"governance record to remove {meta['name']} not accepted: {exc}; deletion waits "
            f"for it (remove the finalizer {FINALIZER} to force, which leaves the network "
            "counting this authority)"
        )
        _event(body, type="Warning", reason="GovernanceRejected", message=message)
        raise kopf.TemporaryError(message, delay=60) from exc
    _event(
        body,
        type="Normal",
        reason="GovernanceSubmitted",
        message=f"remove-authority record for {meta['name']} submitted to {net.name}",
    )
