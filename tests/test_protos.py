"""The committed generated code must match what the .proto files generate today."""

import importlib.util
from pathlib import Path

from conftest import REPO

PROTOS = REPO / "protos"


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    _generator().generate(tmp_path)  # type: ignore[attr-defined]
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "protoc generated nothing"
    committed = {
        path: (PROTOS / path).read_bytes() if (PROTOS / path).exists() else b"" for path in fresh
    }
    stale = sorted(str(path) for path in fresh if fresh[path] != committed[path])
    assert not stale, f"regenerate with 'make proto' and commit: {stale}"
