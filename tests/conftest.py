"""Shared fixtures: free loopback ports and the rule for external tools.

In CI (``CI=true``) a missing tool is a failure, so a green run means the real parts ran;
elsewhere a test that needs a missing tool is skipped with the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """Path of an executable on PATH or in .tools/bin; skip (or fail in CI) without it."""
    path = shutil.which(name) or shutil.which(name, path=str(REPO / ".tools" / "bin"))
    if path is None:
        message = f"{name} is not installed (run .ci/run, or install it as .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(size: int) -> int:
    """The first port of ``size`` consecutive free loopback ports, below the kernel's
    ephemeral range: a client polling a port there before its server listens can be given
    that very port as its source and connect to itself (it then reads its own request back,
    and the server cannot bind)."""
    rng = random.Random()
    top = max(_ephemeral_start(), 10000 + 2 * size)
    for _ in range(200):
        base = rng.randrange(10000, top - size)
        if all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free loopback ports found")


@pytest.fixture
def free_port() -> int:
    return free_port_block(1)
