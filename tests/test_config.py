"""Configuration: valid files load, every mistake is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from grbfl.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def minimal(**sections: dict) -> dict:
    raw = {
        "node": {"role": "participant", "id": "pi1"},
        "data": {"dir": "/data", "classes": ["a", "b"]},
    }
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return raw


def test_minimal_config_gets_sensible_defaults() -> None:
    config = config_from_dict(minimal())
    assert config.strategy.name == "grbfl"
    assert config.broker.port == 1883
    assert config.data.classes == ("a", "b")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder")
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/etc/grbfl/tls/ca.crt", str(ca)))
    config = load_config(copy)
    assert config.node.role == path.stem


def test_unknown_key_is_named_with_its_section_and_the_allowed_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"f\.toml: unknown key training\.epochz.*local_epochs"
    ):
        config_from_dict(minimal(training={"epochz": 3}), source="f.toml")


def test_wrong_role_lists_the_allowed_roles() -> None:
    with pytest.raises(
        ConfigError, match="node.role = 'server'.*aggregator, participant"
    ):
        config_from_dict(minimal(node={"role": "server"}))


def test_out_of_range_number_names_key_and_bounds() -> None:
    with pytest.raises(ConfigError, match="broker.port = 70000 is out of range"):
        config_from_dict(minimal(broker={"port": 70000}))


def test_string_where_number_expected_is_rejected() -> None:
    with pytest.raises(ConfigError, match="training.lr = '0.1'.*a number"):
        config_from_dict(minimal(training={"lr": "0.1"}))


def test_node_id_with_topic_wildcard_is_rejected() -> None:
    with pytest.raises(ConfigError, match="node.id = 'pi/#'"):
        config_from_dict(minimal(node={"id": "pi/#"}))


def test_missing_class_list_is_explained() -> None:
    raw = minimal()
    del raw["data"]["classes"]
    with pytest.raises(ConfigError, match="data.classes"):
        config_from_dict(raw)


def test_resume_temperature_must_be_below_pause() -> None:
    with pytest.raises(ConfigError, match="resume_at_c"):
        config_from_dict(minimal(health={"pause_at_c": 70.0, "resume_at_c": 75.0}))


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="broker.tls_ca = '.*nope.pem': no such file"):
        config_from_dict(minimal(broker={"tls_ca": str(tmp_path / "nope.pem")}))


def test_unreadable_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\nrole = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_written_config_reads_back_identically(tmp_path: Path) -> None:
    config = config_from_dict(minimal(strategy={"variance_threshold": 0.01}))
    path = tmp_path / "round.toml"
    path.write_text(dump_toml(config_to_dict(config)))
    again = load_config(path)
    assert again.strategy == config.strategy
    assert again.data == config.data


def test_health_temperature_file_must_exist(tmp_path: Path) -> None:
    """A thermal file named in the config is checked at start, not silently unread."""
    zone = tmp_path / "temp"
    zone.write_text("48312\n")

    config = config_from_dict(minimal(health={"temperature_file": str(zone)}))
    with pytest.raises(ConfigError, match=r"health\.temperature_file = .*no such file"):
        config_from_dict(minimal(health={"temperature_file": str(tmp_path / "gone")}))

    assert config.health.temperature_file == zone
