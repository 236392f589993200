"""``lorakit serve --config``: a YAML file and a TOML file with the same options give the same ServeConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.serve.app import ServeConfig
from lorakit.train.errors import TrainConfigError

yaml = pytest.importorskip("yaml")

OPTIONS = {"model": "/models/tiny", "adapter": ["sql=/a/sql", "chat=/a/chat"], "max-loaded": 3, "port": 0,
           "max-batch": 4, "drain-timeout": 2.5, "dtype": "fp32", "log-level": "warning"}


def _toml(path: Path, options: dict[str, object]) -> Path:
    def val(v: object) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(f'"{x}"' for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else str(v)

    path.write_text("".join(f"{k} = {val(v)}\n" for k, v in options.items()))
    return path


def test_yaml_and_toml_configs_agree(tmp_path: Path) -> None:
    y = tmp_path / "serve.yaml"
    y.write_text(yaml.safe_dump(OPTIONS))
    from_yaml = ServeConfig.build(ServeConfig.read_file(y))
    from_toml = ServeConfig.build(ServeConfig.read_file(_toml(tmp_path / "serve.toml", OPTIONS)))
    assert from_yaml == from_toml
    assert from_yaml.max_loaded == 3 and from_yaml.max_batch == 4 and from_yaml.drain_timeout == 2.5
    assert from_yaml.adapters() == [("sql", "/a/sql"), ("chat", "/a/chat")]


def test_yaml_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    y = tmp_path / "serve.yml"
    y.write_text(yaml.safe_dump({**OPTIONS, "max-lodaed": 2}))
    with pytest.raises(TrainConfigError, match=r"serve\.yml: unknown key 'max-lodaed'.*max_loaded"):
        ServeConfig.read_file(y)


def test_yaml_bad_value_is_refused(tmp_path: Path) -> None:
    y = tmp_path / "serve.yaml"
    y.write_text(yaml.safe_dump({**OPTIONS, "max-batch": 0}))
    with pytest.raises(TrainConfigError, match="max_batch|max-batch"):
        ServeConfig.build(ServeConfig.read_file(y))
