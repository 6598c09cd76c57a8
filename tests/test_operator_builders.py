"""The pure parts of the operator: spec validation, builders, rollout and conditions.

Every rendered object is validated with kubernetes-validate (strict, Kubernetes 1.37
schemas); ServiceMonitor, which has no bundled schema, is checked for shape only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pyrsia_node import config as node_config
from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.tls import create_ca, issue_node_certificate
from pyrsia_operator import builders, conditions, material, rollout
from pyrsia_operator.spec import SpecError, counted_authority, parse_authority, parse_network

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.37.0"
OWNER = builders.Owner("PyrsiaNetwork", "net", "uid-1")


def example_spec() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "network.yaml").read_text())
    spec: dict[str, Any] = doc["spec"]
    return spec


def render(spec: dict[str, Any], extra_authority: bool = False) -> list[dict[str, Any]]:
    net = parse_network("net", "pyrsia", spec)
    keys = material.generate_network_keys(net.chain_id)
    specs = [counted_authority(net, i) for i in range(net.authority_count or 0)]
    if extra_authority:
        specs.append(
            parse_authority(
                "extra",
                {
                    "networkRef": {"name": "net"},
                    "zone": "z1",
                    "tolerations": [{"key": "k", "operator": "Exists"}],
                    "externalEndpoint": {"host": "extra.example.org"},
                },
            )
        )
    auths = [
        builders.AuthorityMaterial(
            s, Identity.generate(), issue_node_certificate(keys.ca, s.name), not s.from_resource
        )
        for s in specs
    ]
    genesis = builders.desired_genesis(
        net,
        [(a.spec, a.identity.public_key) for a in auths if not a.spec.from_resource],
        keys,
        "2025-01-01T00:00:00Z",
    )
    peer_tls = issue_node_certificate(keys.ca, "peer")
    return builders.desired_objects(
        net, OWNER, genesis, keys, peer_tls, auths, len(auths), service_monitor_available=True
    )


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"peers": {"mode": "DaemonSet"}, "mirror": {"type": "NodePort", "nodePort": 30500}},
        {"metrics": {"serviceMonitor": True}, "bootstrapPeers": ["seed.example.org:44000"]},
    ],
)
def test_every_rendered_object_is_valid_kubernetes(overrides: dict[str, Any], extra: bool) -> None:
    objects = render({**example_spec(), **overrides}, extra)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_objects_carry_owner_reference_and_network_labels() -> None:
    for obj in render(example_spec()):
        assert obj["metadata"]["ownerReferences"] == [OWNER.reference()]
        assert obj["metadata"]["labels"][builders.LABEL_NETWORK] == "net"


def test_node_config_is_loadable_by_the_node() -> None:
    configmap = next(o for o in render(example_spec()) if o["metadata"]["name"] == "net-config")
    for role in ("authority", "peer"):
        settings = yaml.safe_load(configmap["data"][f"{role}.yaml"])
        cfg = node_config.parse(settings)
        assert cfg.role == role
        assert str(cfg.genesis_path) == builders.GENESIS_PATH
        assert len(cfg.bootstrap) == 4


def test_genesis_configmap_round_trips_through_the_node_format() -> None:
    cm = next(o for o in render(example_spec()) if o["metadata"]["name"] == "net-genesis")
    genesis = Genesis.from_dict(json.loads(cm["data"]["genesis.json"]))
    assert genesis.chain_id == "pyrsia-example"
    assert genesis.threshold == 3
    assert genesis.authorities[0].grpc_address == (
        "net-authority-0-0.net-authorities.pyrsia.svc:44000"
    )


def test_pods_run_under_restricted_pod_security() -> None:
    for obj in render(example_spec()):
        if obj["kind"] not in ("StatefulSet", "DaemonSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(("members", "allowed_down"), [(1, 0), (4, 1), (7, 2), (10, 3)])
def test_pdb_allows_at_most_f_authorities_down(members: int, allowed_down: int) -> None:
    net = parse_network("net", "ns", example_spec())
    assert builders.authority_pdb(net, OWNER, members)["spec"]["maxUnavailable"] == allowed_down


@pytest.mark.parametrize("count", [2, 3])
def test_authority_counts_without_bft_quorum_are_refused(count: int) -> None:
    with pytest.raises(SpecError, match=r"3f\+1"):
        parse_network("net", "ns", {**example_spec(), "authorities": {"count": count}})


def test_threshold_above_authority_count_is_refused() -> None:
    with pytest.raises(SpecError, match="could never commit"):
        parse_network("net", "ns", {**example_spec(), "attestationThreshold": 5})


def test_http_upstream_needs_insecure() -> None:
    spec = {**example_spec(), "upstreams": [{"name": "local", "url": "http://r:5000"}]}
    with pytest.raises(SpecError, match="insecure=true"):
        parse_network("net", "ns", spec)


def test_network_policy_opens_grpc_only_across_clusters() -> None:
    net = parse_network("net", "ns", example_spec())
    closed = builders.network_policy(net, OWNER, cross_cluster=False)
    opened = builders.network_policy(net, OWNER, cross_cluster=True)
    assert "from" in closed["spec"]["ingress"][0]
    assert "from" not in opened["spec"]["ingress"][0]


def test_existing_tls_material_round_trips_through_secrets() -> None:
    ca = create_ca("c")
    keys = material.NetworkKeys(ca, Identity.generate())
    net = parse_network("net", "ns", example_spec())
    ca_secret, gov_secret, _ = builders.network_secrets(
        net, OWNER, keys, issue_node_certificate(ca, "p")
    )
    back = material.network_keys_from_secrets(ca_secret, gov_secret)
    assert back.ca == ca
    assert back.governance.public_key == keys.governance.public_key


def observed(hash_: str, ready: bool) -> rollout.Observed:
    return rollout.Observed(hash_, ready)


def test_rollout_updates_one_authority_at_a_time() -> None:
    desired = {f"a{i}": "new" for i in range(4)}
    current = {f"a{i}": observed("old", True) for i in range(4)}
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == ("a0",)
    assert set(plan.waiting) == {"a1", "a2", "a3"}


def test_rollout_waits_while_an_updated_authority_is_not_ready() -> None:
    desired = {f"a{i}": "new" for i in range(4)}
    current = {f"a{i}": observed("old", True) for i in range(4)}
    current["a0"] = observed("new", False)
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == ()
    assert "a0" in plan.reason


def test_rollout_refuses_to_break_quorum() -> None:
    desired = {f"a{i}": "new" for i in range(4)}
    current = {f"a{i}": observed("old", i < 3) for i in range(4)}
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == ("a3",)  # the down one costs nothing
    current = {f"a{i}": observed("old", i < 3) for i in range(4)}
    current["a3"] = observed("new", True)
    current["a2"] = observed("old", False)
    current["a1"] = observed("old", True)
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == ("a2",)
    current["a2"] = observed("new", True)
    current["a3"] = observed("new", False)
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == () and "a3" in plan.reason


def test_rollout_below_quorum_is_refused() -> None:
    desired = {f"a{i}": "new" for i in range(4)}
    current = {"a0": observed("old", True), "a1": observed("old", True)}
    current |= {"a2": observed("new", True), "a3": observed("new", True)}
    ok = rollout.plan_authority_rollout(desired, current, 4)
    assert ok.apply == ("a0",)
    current["a3"] = observed("old", False)
    current["a2"] = observed("old", True)
    plan = rollout.plan_authority_rollout(desired, current, 4)
    assert plan.apply == ("a3",)


def test_conditions_follow_readiness() -> None:
    start = conditions.network_conditions(conditions.NetworkObservation(4, 0, 2, 0))
    by_type = {c.type: c for c in start}
    assert by_type["Ready"].status == "False"
    assert by_type["QuorumAvailable"].status == "False"
    assert by_type["Progressing"].status == "True"
    assert by_type["Degraded"].status == "False"
    done = {
        c.type: c for c in conditions.network_conditions(conditions.NetworkObservation(4, 4, 2, 2))
    }
    assert done["Ready"].status == "True" and done["Progressing"].status == "False"
    down = conditions.NetworkObservation(4, 3, 2, 2, was_ready=True)
    fault = {c.type: c for c in conditions.network_conditions(down)}
    assert fault["Degraded"].status == "True" and fault["QuorumAvailable"].status == "True"


def test_transition_time_moves_only_on_status_change() -> None:
    first, changed = conditions.merge_conditions(
        [], conditions.network_conditions(conditions.NetworkObservation(4, 0, 0, 0)), 1, "t1"
    )
    assert len(changed) == 4
    second, changed = conditions.merge_conditions(
        first, conditions.network_conditions(conditions.NetworkObservation(4, 1, 0, 0)), 2, "t2"
    )
    assert changed == []
    assert all(c["lastTransitionTime"] == "t1" and c["observedGeneration"] == 2 for c in second)
