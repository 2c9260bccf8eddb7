"""The example configuration files are valid: every key known, every value well formed."""

from __future__ import annotations

import pathlib

import pytest

from rawproxy.cli import build_config, load_config_file

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(path: pathlib.Path) -> None:
    config = build_config(load_config_file(str(path)))
    assert config.listen
    assert config.routes


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"openqa.toml", "routes.toml"} <= names


def test_relative_paths_in_a_file_are_relative_to_it(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "conf.d" / "rawproxy.toml"
    conf.parent.mkdir()
    conf.write_text(
        'listen = [":8443"]\nbackend = "http://127.0.0.1:9000"\nbackend-ca = "ca.pem"\n'
        '[[certificate]]\ncert = "site.pem"\nkey = "/abs/site.key"\n'
    )
    config = build_config(load_config_file(str(conf)))
    assert config.backend_ca == str(conf.parent / "ca.pem")
    assert config.certs[0].cert == str(conf.parent / "site.pem")
    assert config.certs[0].key == "/abs/site.key"
