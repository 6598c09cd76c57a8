"""The operator's own Prometheus metrics (prefix ``pyrsia_operator_``, base units)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Histogram

RECONCILE_TOTAL = Counter(
    "pyrsia_operator_reconcile_total", "Reconciliations started, by resource kind", ["kind"]
)
RECONCILE_ERRORS = Counter(
    "pyrsia_operator_reconcile_errors_total",
    "Reconciliations that failed, by resource kind and error class",
    ["kind", "error"],
)
RECONCILE_DURATION = Histogram(
    "pyrsia_operator_reconcile_duration_seconds",
    "Time spent in one reconciliation, by resource kind",
    ["kind"],
)
GOVERNANCE_SUBMISSIONS = Counter(
    "pyrsia_operator_governance_submissions_total",
    "Membership records submitted to authorities, by action and result",
    ["action", "result"],
)


@asynccontextmanager
async def reconciling(kind: str) -> AsyncIterator[None]:
    """Count and time one reconciliation; an escaping exception counts as an error."""
    RECONCILE_TOTAL.labels(kind).inc()
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        RECONCILE_ERRORS.labels(kind, type(exc).__name__).inc()
        raise
    finally:
        RECONCILE_DURATION.labels(kind).observe(time.perf_counter() - start)
