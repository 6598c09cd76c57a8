"""Errors the CLI prints as one line, without a traceback."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: ``pyrsia: <message>`` on stderr and exit status 1."""
