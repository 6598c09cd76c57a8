"""kopf peering for several operator replicas: the peering objects, and one priority each.

kopf lets only one of several operators act, through a peering object (``ClusterKopfPeering``
for a cluster-wide operator, one ``KopfPeering`` per watched namespace otherwise) in which
every replica keeps its liveness and priority. Two facts of kopf decide how we run it:

* With a peering name given (``--peering``, as the chart does), an operator stays paused
  until it has seen its peering object; kopf never creates that object. The chart cannot
  render it either (its CRD is installed by the same release, and Helm maps every kind
  before creating anything), so ``ensure_peering`` creates it at start-up, before kopf runs.
* Operators with the same priority all pause ("possibly conflicting operators"), leaving
  the cluster unserved. So each replica starts with its own random priority
  (``random_priority``): the highest acts; when it dies, its entry expires and the next
  resumes.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from pyrsia_operator.kube import Kube, KubeError

GROUP_VERSION = "kopf.dev/v1"


def random_priority() -> int:
    """A priority in 1..2**31-1; two replicas draw the same one with probability ~5e-10."""
    return 1 + secrets.randbelow(2**31 - 1)


def peering_objects(name: str, namespaces: Sequence[str]) -> list[tuple[str, dict[str, object]]]:
    """(collection path, object) of each peering object an operator with ``namespaces``
    (empty: cluster-wide) uses under peering name ``name``."""
    if not namespaces:
        body: dict[str, object] = {
            "apiVersion": GROUP_VERSION,
            "kind": "ClusterKopfPeering",
            "metadata": {"name": name},
        }
        return [(f"/apis/{GROUP_VERSION}/clusterkopfpeerings", body)]
    return [
        (
            f"/apis/{GROUP_VERSION}/namespaces/{ns}/kopfpeerings",
            {
                "apiVersion": GROUP_VERSION,
                "kind": "KopfPeering",
                "metadata": {"name": name, "namespace": ns},
            },
        )
        for ns in namespaces
    ]


async def ensure_peering(kube: Kube, name: str, namespaces: Sequence[str]) -> list[str]:
    """Create the peering objects that do not exist yet; the paths of those created.

    Another replica may create the same object at the same moment: a conflict means it
    exists, which is all that is needed."""
    created = []
    for collection, body in peering_objects(name, namespaces):
        path = f"{collection}/{name}"
        if await kube.read(path) is not None:
            continue
        try:
            await kube.post(collection, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            continue
        created.append(path)
    return created
