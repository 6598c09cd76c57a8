"""The CRDs: structural schemas that accept the examples, and CEL rules that refuse what the
operator refuses, evaluated with cel-python (the emulator runs neither)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent
CRDS = {"PyrsiaNetwork": "pyrsianetwork.yaml", "AuthorityNode": "authoritynode.yaml"}


def crd(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "crds" / CRDS[kind]).read_text())
    return doc


def schema(kind: str) -> dict[str, Any]:
    result: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def rules(
    node: dict[str, Any], path: str = ""
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, schema node, rule) for every x-kubernetes-validations entry."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path, node, rule
    for key, child in (node.get("properties") or {}).items():
        yield from rules(child, f"{path}.{key}")
    if "items" in node:
        yield from rules(node["items"], f"{path}[]")


def at(obj: Any, path: str) -> list[Any]:
    values = [obj]
    for part in [p for p in path.split(".") if p]:
        many = part.endswith("[]")
        key = part.removesuffix("[]")
        values = [v[key] for v in values if isinstance(v, dict) and key in v]
        if many:
            values = [item for v in values for item in v]
    return values


def cel_failures(kind: str, new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    env = celpy.Environment()
    failures = []
    for path, _, rule in rules(schema(kind)):
        transition = "oldSelf" in rule["rule"]
        news = at(new, path)
        olds = at(old, path) if old is not None else []
        if transition and (old is None or len(olds) != len(news)):
            continue  # transition rules run only on updates with an old value
        program = env.program(env.compile(rule["rule"]))
        for i, value in enumerate(news):
            activation = {"self": celpy.json_to_cel(value)}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(olds[i])
            if not bool(program.evaluate(activation)):
                failures.append(rule["message"])
    return failures


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return doc


@pytest.mark.parametrize("kind", list(CRDS))
def test_crd_is_a_valid_kubernetes_object(kind: str) -> None:
    kubernetes_validate.validate(crd(kind), "1.37.0", strict=True)


@pytest.mark.parametrize("kind", list(CRDS))
def test_chart_carries_an_identical_copy(kind: str) -> None:
    chart_copy = REPO / "charts" / "pyrsia-operator" / "files" / "crds" / CRDS[kind]
    assert chart_copy.read_text() == (REPO / "crds" / CRDS[kind]).read_text(), (
        f"copy crds/{CRDS[kind]} to {chart_copy.relative_to(REPO)}"
    )


@pytest.mark.parametrize(
    ("kind", "file"), [("PyrsiaNetwork", "network.yaml"), ("AuthorityNode", "authoritynode.yaml")]
)
def test_examples_satisfy_schema_and_rules(kind: str, file: str) -> None:
    doc = example(file)
    jsonschema.validate(doc, schema(kind))
    assert cel_failures(kind, doc) == []


def test_network_crd_has_scale_status_and_printer_columns() -> None:
    version = crd("PyrsiaNetwork")["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.peers.replicas"
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Authorities", "Peers", "Height", "Age"]


@pytest.mark.parametrize("count", [2, 3])
def test_authority_count_without_bft_quorum_is_refused_with_reason(count: int) -> None:
    doc = example("network.yaml")
    doc["spec"]["authorities"]["count"] = count
    doc["spec"].pop("attestationThreshold")
    failures = cel_failures("PyrsiaNetwork", doc)
    assert len(failures) == 1 and "3f+1" in failures[0] and "halts" in failures[0]


@pytest.mark.parametrize("count", [1, 4, 7])
def test_authority_counts_with_bft_quorum_are_accepted(count: int) -> None:
    doc = example("network.yaml")
    doc["spec"]["authorities"]["count"] = count
    doc["spec"]["attestationThreshold"] = 1
    assert cel_failures("PyrsiaNetwork", doc) == []


def test_chain_id_is_immutable() -> None:
    old = example("network.yaml")
    new = copy.deepcopy(old)
    new["spec"]["chainId"] = "another-chain"
    failures = cel_failures("PyrsiaNetwork", new, old)
    assert any("chainId is immutable" in f for f in failures)


def test_genesis_authorities_are_immutable_but_peers_scale() -> None:
    old = example("network.yaml")
    scaled = copy.deepcopy(old)
    scaled["spec"]["peers"]["replicas"] = 9
    assert cel_failures("PyrsiaNetwork", scaled, old) == []
    grown = copy.deepcopy(old)
    grown["spec"]["authorities"]["count"] = 7
    assert any("AuthorityNode" in f for f in cel_failures("PyrsiaNetwork", grown, old))


def test_threshold_above_authorities_is_refused() -> None:
    doc = example("network.yaml")
    doc["spec"]["attestationThreshold"] = 5
    assert any("could never commit" in f for f in cel_failures("PyrsiaNetwork", doc))


def test_count_and_nodes_are_exclusive() -> None:
    doc = example("network.yaml")
    doc["spec"]["authorities"]["nodes"] = ["a", "b", "c", "d"]
    assert any("exactly one" in f for f in cel_failures("PyrsiaNetwork", doc))


def test_unknown_mirror_type_fails_the_schema() -> None:
    doc = example("network.yaml")
    doc["spec"]["mirror"]["type"] = "Ingress"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema("PyrsiaNetwork"))
