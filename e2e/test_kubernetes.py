"""End to end on a real cluster: install the chart, run the example network, pull through it.

Runs when ``KUBECONFIG`` is set; otherwise every test is skipped. The image under test is
``PYRSIA_E2E_IMAGE`` (e.g. an image loaded into kind). Needs ``kubectl`` and ``helm`` on PATH
or in ``.tools/bin``. Everything is created in a fresh namespace that is deleted at the end.
Run: ``KUBECONFIG=~/.kube/config PYRSIA_E2E_IMAGE=pyrsia:dev .venv/bin/pytest e2e -v``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG not set: no cluster"),
    pytest.mark.timeout(1800),
]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(REPO / ".tools" / "bin"))
    if path is None:
        pytest.fail(f"{name} is needed for the e2e tests (see .ci/install-helm.sh)")
    return path


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kubectl(*args: str, stdin: str | None = None, timeout: float = 300) -> str:
    return run(tool("kubectl"), *args, stdin=stdin, timeout=timeout)


def wait_for(probe: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(5)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


@pytest.fixture(scope="module")
def image() -> str:
    value = os.environ.get("PYRSIA_E2E_IMAGE")
    if not value:
        pytest.fail("set PYRSIA_E2E_IMAGE to the image under test (repository:tag)")
    return value


@pytest.fixture(scope="module")
def namespace(image: str) -> Iterator[str]:
    ns = f"pyrsia-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    repository, _, tag = image.rpartition(":")
    run(
        tool("helm"),
        "install",
        f"op-{ns}",
        str(REPO / "charts" / "pyrsia-operator"),
        "--namespace",
        ns,
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "replicaCount=1",
        "--set",
        "crds.keep=false",
        "--set",
        f"watchNamespaces={{{ns}}}",
        "--wait",
        timeout=600,
    )
    try:
        yield ns
    finally:
        kubectl("delete", "pyrsianetworks", "--all", "-n", ns, "--wait=true", timeout=600)
        run(tool("helm"), "uninstall", f"op-{ns}", "--namespace", ns, timeout=300)
        kubectl("delete", "namespace", ns, "--wait=false")


def network(ns: str) -> dict[str, Any]:
    out = kubectl("get", "pyrsianetwork", "example", "-n", ns, "-o", "json")
    result: dict[str, Any] = json.loads(out)
    return result


def condition(obj: dict[str, Any], kind: str) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return str(cond["status"])
    return "Unknown"


@pytest.fixture(scope="module")
def ready_network(namespace: str, image: str) -> str:
    doc = yaml.safe_load((REPO / "examples" / "network.yaml").read_text())
    doc["spec"]["image"] = image
    doc["spec"]["imagePullPolicy"] = "IfNotPresent"
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    wait_for(lambda: condition(network(namespace), "Ready") == "True", 900, "network Ready")
    return namespace


def committed(ns: str) -> dict[str, Any] | None:
    net = network(ns)
    height = ((net.get("status") or {}).get("ledger") or {}).get("height", 0)
    return net if height >= 1 else None


def test_network_becomes_ready_and_commits_a_block(ready_network: str) -> None:
    net = wait_for(lambda: committed(ready_network), 600, "a first committed block")
    assert condition(net, "QuorumAvailable") == "True"


def test_pod_pulls_an_image_through_the_mirror(ready_network: str) -> None:
    mirror = f"example-mirror.{ready_network}.svc"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pull", "namespace": ready_network},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "skopeo",
                    "image": "quay.io/skopeo/stable:v1.16",
                    "args": [
                        "inspect",
                        "--tls-verify=false",
                        # No "?ns=": that is containerd's mirror parameter, and skopeo
                        # refuses it as an invalid reference. The Service serves plain
                        # HTTP on port 80 (examples/network.yaml), so name the port.
                        f"docker://{mirror}:80/library/busybox:1.36",
                    ],
                }
            ],
        },
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    phase = wait_for(
        lambda: (
            kubectl("get", "pod", "pull", "-n", ready_network, "-o", "jsonpath={.status.phase}")
            in ("Succeeded", "Failed")
            and kubectl("get", "pod", "pull", "-n", ready_network, "-o", "jsonpath={.status.phase}")
        ),
        600,
        "the pull pod to finish",
    )
    logs = kubectl("logs", "pull", "-n", ready_network)
    assert phase == "Succeeded", logs
    assert "Digest" in logs


def test_scale_peers(ready_network: str) -> None:
    kubectl("scale", "pyrsianetwork", "example", "-n", ready_network, "--replicas=3")
    wait_for(
        lambda: (network(ready_network)["status"].get("peers") or {}).get("summary") == "3/3",
        600,
        "3 ready peers",
    )


def test_delete_network_releases_finalizer(ready_network: str) -> None:
    kubectl("delete", "pyrsianetwork", "example", "-n", ready_network, "--wait=true", timeout=600)
    out = kubectl("get", "pyrsianetworks", "-n", ready_network, "-o", "name")
    assert out.strip() == ""
