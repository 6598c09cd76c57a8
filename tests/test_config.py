from pathlib import Path

import pytest
from pyrsia_node.config import ConfigError, NodeConfig, Weights, load


def test_defaults_when_nothing_is_set() -> None:
    assert load(environ={}) == NodeConfig()


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("role: authority\nhttp_port: 8080\nbootstrap: ['a:1', 'b:2']\n")
    config = load(path, environ={})
    assert config.role == "authority"
    assert config.http_port == 8080
    assert config.bootstrap == ("a:1", "b:2")


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('role = "peer"\n[weights]\ncpu = 2.5\n')
    assert load(path, environ={}).weights == Weights(cpu=2.5)


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("grpc_port: 1000\n")
    config = load(path, environ={"PYRSIA_GRPC_PORT": "2000", "PYRSIA_WEIGHTS_DISK": "0.5"})
    assert config.grpc_port == 2000
    assert config.weights.disk == 0.5


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("name: from-file\n")
    assert load(environ={"PYRSIA_CONFIG": str(path)}).name == "from-file"


@pytest.mark.parametrize(
    ("environ", "key", "value"),
    [
        ({"PYRSIA_HTTP_PORT": "seventy"}, "http_port", "seventy"),
        ({"PYRSIA_HTTP_PORT": "70000"}, "http_port", "70000"),
        ({"PYRSIA_ROLE": "king"}, "role", "king"),
        ({"PYRSIA_INSECURE_PLAINTEXT": "maybe"}, "insecure_plaintext", "maybe"),
        ({"PYRSIA_WEIGHTS_CPU": "-1"}, "weights.cpu", "-1"),
        ({"PYRSIA_WEIGHTS_CPU": "nan"}, "weights.cpu", "nan"),
        ({"PYRSIA_WEIGHTS_GPU": "1"}, "weights.gpu", "1"),
        ({"PYRSIA_BOOTSTRAP": "host-without-port"}, "bootstrap", "host-without-port"),
        ({"PYRSIA_METRICS_INTERVAL": "0"}, "metrics_interval", "0"),
        ({"PYRSIA_COLOUR": "blue"}, "PYRSIA_COLOUR", "blue"),
    ],
)
def test_invalid_value_names_key_and_value(environ: dict[str, str], key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ=environ)
    assert caught.value.key == key
    assert caught.value.value == value
    assert key in str(caught.value) and repr(value) in str(caught.value)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("http_prot: 80\n")
    with pytest.raises(ConfigError, match="http_prot"):
        load(path, environ={})


def test_unparsable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("role: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML or TOML"):
        load(path, environ={})


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable file"):
        load(tmp_path / "absent.yaml", environ={})
