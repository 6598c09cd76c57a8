"""The Pyrsia Kubernetes operator (kopf).

Layout: ``spec`` validates custom resources, ``material`` handles key material,
``builders`` renders Kubernetes objects (pure), ``rollout`` and ``conditions`` decide
(pure), ``governance`` signs membership changes, ``nodestatus`` reads nodes' admin API,
``kube`` is the REST client, ``metrics`` the operator's own metrics and ``handlers`` the kopf
handlers that wire them together. Importing ``handlers`` registers them with kopf; this
package import does not.
"""

from pyrsia_operator.spec import NetworkSpec, SpecError, parse_authority, parse_network

__all__ = ["NetworkSpec", "SpecError", "parse_authority", "parse_network"]
