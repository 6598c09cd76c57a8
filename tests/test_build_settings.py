"""The node settings the mirror path adds: mirror_mode, build_timeout, upstream_overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pyrsia_node import config
from pyrsia_node.config import ConfigError
from pyrsia_node.genesis import GenesisError, Upstream, create_network
from pyrsia_node.server import Node


def test_defaults_are_strict_with_a_minute_and_no_overrides() -> None:
    settings = config.parse({})
    assert settings.mirror_mode == "strict"
    assert settings.build_timeout == 60.0
    assert settings.upstream_overrides == ()


def test_settings_come_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {"mirror_mode": "fallback", "upstream_overrides": {"docker.io": "http://cache:5000/"}}
        )
    )
    settings = config.load(path, environ={"PYRSIA_BUILD_TIMEOUT": "12.5"})
    assert settings.mirror_mode == "fallback"
    assert settings.build_timeout == 12.5
    assert settings.upstream_overrides == (("docker.io", "http://cache:5000"),)
    from_env = config.load(
        environ={"PYRSIA_UPSTREAM_OVERRIDES": "ghcr.io=https://a.test, docker.io=http://b.test"}
    )
    assert from_env.upstream_overrides == (
        ("docker.io", "http://b.test"),
        ("ghcr.io", "https://a.test"),
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mirror_mode": "lazy"}, "'strict' or 'fallback'"),
        ({"build_timeout": "0"}, "a number > 0"),
        ({"upstream_overrides": {"docker.io": "ftp://x"}}, "http:// or https://"),
        ({"upstream_overrides": "docker.io"}, "NAME=URL"),
        ({"upstream_overrides": ["docker.io"]}, "a mapping"),
    ],
)
def test_bad_values_name_the_setting(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse(raw)


def test_an_override_for_a_registry_the_genesis_does_not_mirror_stops_the_node(
    tmp_path: Path,
) -> None:
    network = create_network(
        tmp_path,
        authorities=1,
        peers=0,
        base_port=30000,
        upstreams=(Upstream("docker.io", "https://registry-1.docker.io"),),
    )
    node_file = network.nodes[0].config_file
    settings = yaml.safe_load(node_file.read_text())
    settings["upstream_overrides"] = {"quay.io": "http://127.0.0.1:1"}
    node_file.write_text(yaml.safe_dump(settings))
    with pytest.raises(GenesisError, match=r"quay\.io, which the genesis does not list"):
        Node(config.load(node_file, environ={}))
