"""The Helm chart: lint --strict and template with default and maximal values; every
rendered object validated with kubernetes-validate (CRDs, monitoring kinds by shape)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import require_tool

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "pyrsia-operator"
MAXIMAL = REPO / "tests" / "data" / "operator" / "values-maximal.yaml"
VALUES = {"default": [], "maximal": ["-f", str(MAXIMAL)]}
MONITORING = {"ServiceMonitor", "PrometheusRule"}


def helm(*args: str) -> str:
    result = subprocess.run(
        [require_tool("helm"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rendered(values: list[str]) -> list[dict[str, Any]]:
    out = helm("template", "pyrsia", str(CHART), "--namespace", "pyrsia-system", *values)
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("values", list(VALUES))
def test_lint_strict(values: str) -> None:
    helm("lint", "--strict", str(CHART), *VALUES[values])


@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_objects_are_valid(values: str) -> None:
    objects = rendered(VALUES[values])
    assert objects
    for obj in objects:
        if obj["kind"] in MONITORING:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        kubernetes_validate.validate(obj, "1.37.0", strict=True)


def test_maximal_values_render_monitoring_and_dashboards() -> None:
    kinds = [o["kind"] for o in rendered(VALUES["maximal"])]
    assert "ServiceMonitor" in kinds and "PrometheusRule" in kinds
    dashboards = [o for o in rendered(VALUES["maximal"]) if o["kind"] == "ConfigMap"]
    assert len(dashboards) == 3


def test_operator_runs_under_restricted_pod_security() -> None:
    (deployment,) = [o for o in rendered([]) if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_crds_are_kept_on_uninstall_by_default_and_optionally_not() -> None:
    kept = [o for o in rendered([]) if o["kind"] == "CustomResourceDefinition"]
    assert all(o["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for o in kept)
    dropped = [o for o in rendered(VALUES["maximal"]) if o["kind"] == "CustomResourceDefinition"]
    assert all(
        "helm.sh/resource-policy" not in (o["metadata"].get("annotations") or {}) for o in dropped
    )


def test_values_schema_rejects_unknown_keys() -> None:
    result = subprocess.run(
        [require_tool("helm"), "template", "x", str(CHART), "--set", "bogus=1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "bogus" in result.stderr
