"""Typed node settings, read from a YAML/TOML file and ``PYRSIA_*`` environment variables.

Precedence: defaults < file < environment. Every key has one spelling in the file
(``weights.cpu``) and one in the environment (``PYRSIA_WEIGHTS_CPU``). An unknown key or a
value that does not parse raises ``ConfigError`` naming the key, the value and what is
accepted; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Role = Literal["authority", "peer"]
MirrorMode = Literal["strict", "fallback"]
ENV_PREFIX = "PYRSIA_"


class ConfigError(ValueError):
    """A setting is unknown or has a value that cannot be used."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        super().__init__(f"invalid setting {key}={value!r}: expected {expected}")
        self.key = key
        self.value = value


@dataclass(frozen=True, slots=True)
class Weights:
    """Weights of Q(x) = sum(weight * attribute); lower Q means a better provider."""

    cpu: float = 1.0  # per unit of 1-minute load average
    network: float = 0.001  # per packet/s in + out
    disk: float = 0.01  # per disk operation/s
    uploads: float = 0.5  # per blob upload in flight


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path = Path("/var/lib/pyrsia")
    genesis: Path | None = None  # default: <data_dir>/genesis.json
    role: Role = "peer"
    name: str = ""
    listen_host: str = "0.0.0.0"
    advertise_host: str = "127.0.0.1"
    http_port: int = 7888
    grpc_port: int = 44000
    metrics_port: int = 9090
    bootstrap: tuple[str, ...] = ()
    insecure_plaintext: bool = False  # debugging only: gRPC without TLS
    metrics_interval: float = 1.0
    log_level: str = "INFO"
    weights: Weights = field(default_factory=Weights)
    # What the OCI pull API does with content no committed record covers yet: "strict"
    # waits up to build_timeout for the authorities to commit it, "fallback" answers 404 at
    # once (containerd then pulls from its upstream) while the build runs.
    mirror_mode: MirrorMode = "strict"
    build_timeout: float = 60.0
    # Authorities only: registry name -> URL to fetch from instead of the genesis upstream's
    # URL (e.g. a regional pull-through cache). Attestations still name the registry.
    upstream_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def genesis_path(self) -> Path:
        return self.genesis if self.genesis is not None else self.data_dir / "genesis.json"

    @property
    def grpc_address(self) -> str:
        return f"{self.advertise_host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"{self.advertise_host}:{self.http_port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.advertise_host}:{self.metrics_port}"


def _port(key: str, raw: object) -> int:
    value = _int(key, raw)
    if not 1 <= value <= 65535:
        raise ConfigError(key, raw, "a TCP port from 1 to 65535")
    return value


def _int(key: str, raw: object) -> int:
    if isinstance(raw, bool):
        raise ConfigError(key, raw, "an integer")
    try:
        return int(str(raw))
    except ValueError:
        raise ConfigError(key, raw, "an integer") from None


def _nonneg_float(key: str, raw: object) -> float:
    try:
        value = float(str(raw))
    except ValueError:
        raise ConfigError(key, raw, "a number") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(key, raw, "a finite number >= 0")
    return value


def _positive_float(key: str, raw: object) -> float:
    value = _nonneg_float(key, raw)
    if value == 0:
        raise ConfigError(key, raw, "a number > 0")
    return value


def _bool(key: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(key, raw, "true or false")


def _role(key: str, raw: object) -> Role:
    if raw == "authority":
        return "authority"
    if raw == "peer":
        return "peer"
    raise ConfigError(key, raw, "'authority' or 'peer'")


def _path(key: str, raw: object) -> Path:
    if not isinstance(raw, str | Path) or not str(raw):
        raise ConfigError(key, raw, "a file system path")
    return Path(raw)


def _text(key: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigError(key, raw, "a string")
    return raw


def _addresses(key: str, raw: object) -> tuple[str, ...]:
    items: list[object]
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise ConfigError(key, raw, "a list of host:port addresses")
    for item in items:
        host, sep, port = str(item).rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(key, item, "host:port")
    return tuple(str(item) for item in items)


def _mirror_mode(key: str, raw: object) -> MirrorMode:
    if raw == "strict":
        return "strict"
    if raw == "fallback":
        return "fallback"
    raise ConfigError(key, raw, "'strict' or 'fallback'")


def _upstream_overrides(key: str, raw: object) -> tuple[tuple[str, str], ...]:
    expected = "a mapping of registry name to http(s) URL (NAME=URL,... in the environment)"
    pairs: list[tuple[object, object]]
    if isinstance(raw, str):
        pairs = []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            registry, sep, address = part.partition("=")
            if not sep:
                raise ConfigError(key, part, expected)
            pairs.append((registry.strip(), address.strip()))
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    else:
        raise ConfigError(key, raw, expected)
    out: list[tuple[str, str]] = []
    for name, url in pairs:
        if not isinstance(name, str) or not name or not isinstance(url, str):
            raise ConfigError(key, {name: url}, expected)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.{name}", url, "an http:// or https:// URL")
        out.append((name, url.rstrip("/")))
    return tuple(sorted(out))


def _log_level(key: str, raw: object) -> str:
    text = str(raw).upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(key, raw, "one of DEBUG, INFO, WARNING, ERROR")
    return text


_Parser = Callable[[str, object], Any]

_NODE_PARSERS: dict[str, _Parser] = {
    "data_dir": _path,
    "genesis": _path,
    "role": _role,
    "name": _text,
    "listen_host": _text,
    "advertise_host": _text,
    "http_port": _port,
    "grpc_port": _port,
    "metrics_port": _port,
    "bootstrap": _addresses,
    "insecure_plaintext": _bool,
    "metrics_interval": _positive_float,
    "log_level": _log_level,
    "mirror_mode": _mirror_mode,
    "build_timeout": _positive_float,
    "upstream_overrides": _upstream_overrides,
}
_WEIGHT_KEYS = tuple(f.name for f in dataclasses.fields(Weights))


def read_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``/other) or TOML (``.toml``) settings file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", str(path), f"a readable file ({exc.strerror})") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("config", str(path), f"valid YAML or TOML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "a mapping of settings at the top level")
    return data


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    for env_key, value in environ.items():
        if not env_key.startswith(ENV_PREFIX) or env_key == "PYRSIA_CONFIG":
            continue
        key = env_key[len(ENV_PREFIX) :].lower()
        if key.startswith("weights_"):
            weights[key[len("weights_") :]] = value
        elif key in _NODE_PARSERS:
            settings[key] = value
        else:
            known = ", ".join(ENV_PREFIX + k.upper() for k in _NODE_PARSERS)
            raise ConfigError(env_key, value, f"a known variable ({known}, PYRSIA_WEIGHTS_*)")
    if weights:
        settings["weights"] = weights
    return settings


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse(raw: Mapping[str, Any]) -> NodeConfig:
    """Build a ``NodeConfig`` from plain settings, validating every key and value."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "weights":
            values["weights"] = _parse_weights(value)
        elif key in _NODE_PARSERS:
            values[key] = _NODE_PARSERS[key](key, value)
        else:
            raise ConfigError(key, value, f"a known setting ({', '.join(_NODE_PARSERS)}, weights)")
    return NodeConfig(**values)


def _parse_weights(raw: object) -> Weights:
    if not isinstance(raw, Mapping):
        raise ConfigError("weights", raw, f"a mapping with keys {', '.join(_WEIGHT_KEYS)}")
    values: dict[str, float] = {}
    for key, value in raw.items():
        if key not in _WEIGHT_KEYS:
            raise ConfigError(f"weights.{key}", value, f"one of {', '.join(_WEIGHT_KEYS)}")
        values[key] = _nonneg_float(f"weights.{key}", value)
    return Weights(**values)


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Settings from defaults, then ``path`` (or ``$PYRSIA_CONFIG``), then the environment."""
    env = os.environ if environ is None else environ
    if path is None and env.get("PYRSIA_CONFIG"):
        path = Path(env["PYRSIA_CONFIG"])
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    raw = _merge(raw, _from_env(env))
    raw = _merge(raw, overrides or {})
    return parse(raw)
