"""``pyrsia node``: run one node process until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from pyrsia_node import config
from pyrsia_node.localnet import die_with_parent


def register(sub: Any) -> None:
    parser = sub.add_parser("node", help="run a node (settings from --config and PYRSIA_*)")
    parser.add_argument("--config", type=Path, default=None, help="YAML or TOML settings file")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    settings = config.load(args.config)
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s {settings.name or 'node'} %(levelname)s %(name)s: %(message)s",
    )
    from pyrsia_node import server

    asyncio.run(server.run(settings))
    return 0
