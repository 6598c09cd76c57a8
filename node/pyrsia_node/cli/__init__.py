"""The ``pyrsia`` command. Each subcommand lives in its own module with a ``register``
function that adds its parser; ``main`` only dispatches. Modules import heavy
dependencies (kopf, grpc) inside their handlers so ``pyrsia --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyrsia_node import __version__
from pyrsia_node.cli import (
    build_cmd,
    drill_cmd,
    genesis_cmd,
    governance_cmd,
    log_cmd,
    node_cmd,
    operator_cmd,
    status_cmd,
    up_cmd,
)
from pyrsia_node.cli.errors import CliError
from pyrsia_node.config import ConfigError
from pyrsia_node.genesis import GenesisError
from pyrsia_node.identity import IdentityError
from pyrsia_node.tls import TlsError

SUBCOMMANDS = (
    node_cmd,
    genesis_cmd,
    up_cmd,
    status_cmd,
    drill_cmd,
    build_cmd,
    governance_cmd,
    log_cmd,
    operator_cmd,
)
USER_ERRORS = (CliError, ConfigError, GenesisError, IdentityError, TlsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrsia", description="Pyrsia: a verifiable open-source package network."
    )
    parser.add_argument("--version", action="version", version=f"pyrsia {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except USER_ERRORS as exc:
        print(f"pyrsia: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
