"""Device health readings and the heat guard, from fake sysfs files."""

from __future__ import annotations

import json
import logging
from collections import namedtuple
from pathlib import Path

import pytest

from grbfl.errors import ConfigError
from grbfl.health import HealthReader, HeatGuard, decode_throttled, read_health

Temp = namedtuple("Temp", "label current high critical")


def quiet_reader(tmp_path: Path, **sources) -> HealthReader:
    """A reader whose every source is fake or off unless the test gives one."""
    defaults = {
        "thermal_file": tmp_path / "no-thermal-zone",
        "throttle_file": None,
        "vcgencmd": None,
        "sensors": None,
    }
    return HealthReader(**{**defaults, **sources})


def test_read_health_returns_every_key_as_json():
    """The real machine's snapshot has all keys and survives json.dumps."""
    health = read_health()

    assert set(health) == {
        "temperature_c",
        "throttle",
        "cpu_freq_mhz",
        "load_avg",
        "cpu_percent",
        "memory",
    }
    assert len(health["load_avg"]) == 3
    assert set(health["memory"]) == {"used_bytes", "available_bytes", "percent"}
    assert health["memory"]["available_bytes"] > 0
    assert health["temperature_c"] is None or isinstance(health["temperature_c"], float)
    assert json.loads(json.dumps(health)) == health


def test_throttle_flags_are_decoded_from_the_firmware_file(tmp_path):
    """0x50005: under-voltage and throttled now, and both since boot."""
    throttle = tmp_path / "get_throttled"
    throttle.write_text("50005\n")

    flags = quiet_reader(tmp_path, throttle_file=throttle).throttle()

    assert flags == {
        "raw": "0x50005",
        "now": {
            "under_voltage": True,
            "freq_capped": False,
            "throttled": True,
            "soft_temp_limit": False,
        },
        "since_boot": {
            "under_voltage": True,
            "freq_capped": False,
            "throttled": True,
            "soft_temp_limit": False,
        },
    }


def test_throttle_flags_fall_back_to_vcgencmd(tmp_path):
    """Without the sysfs file the vcgencmd answer is parsed."""
    fake = tmp_path / "vcgencmd"
    fake.write_text("#!/bin/sh\necho throttled=0xa0002\n")
    fake.chmod(0o755)

    flags = quiet_reader(tmp_path, vcgencmd=str(fake)).throttle()

    assert flags is not None
    assert flags["now"]["freq_capped"]
    assert not flags["now"]["soft_temp_limit"]
    assert flags["since_boot"]["freq_capped"]
    assert flags["since_boot"]["soft_temp_limit"]


def test_unreadable_throttle_source_warns_once_then_reads_none(tmp_path, caplog):
    """A garbled file is reported once and then skipped on every later read."""
    throttle = tmp_path / "get_throttled"
    throttle.write_text("not hex\n")
    reader = quiet_reader(tmp_path, throttle_file=throttle)

    with caplog.at_level(logging.WARNING, logger="grbfl.health"):
        results = [reader.throttle() for _ in range(3)]

    assert results == [None, None, None]
    assert len(caplog.records) == 1


def test_no_throttle_source_means_none(tmp_path):
    """Off a Raspberry Pi there are no throttle flags at all."""
    assert quiet_reader(tmp_path).throttle() is None


def test_decode_throttled_of_zero_is_all_clear():
    """A healthy Pi reports no flag, now or since boot."""
    flags = decode_throttled(0)

    assert flags["raw"] == "0x0"
    assert not any(flags["now"].values())
    assert not any(flags["since_boot"].values())


def test_temperature_prefers_the_pi_cpu_zone(tmp_path):
    """cpu_thermal wins over other sensors that psutil lists."""
    sensors = {
        "nvme": [Temp("Composite", 38.0, 80.0, 85.0)],
        "cpu_thermal": [Temp("", 61.25, None, None)],
    }

    temp = quiet_reader(tmp_path, sensors=lambda: sensors).cpu_temperature()

    assert temp == 61.2


def test_temperature_falls_back_to_the_thermal_zone_file(tmp_path):
    """With no psutil sensors the millidegree file of zone 0 is read."""
    zone = tmp_path / "temp"
    zone.write_text("48312\n")

    reader = quiet_reader(tmp_path, thermal_file=zone, sensors=lambda: {})

    assert reader.cpu_temperature() == 48.3


def test_temperature_is_none_when_unknown(tmp_path):
    """No sensor and no thermal zone: the temperature is unknown, not an error."""
    reader = quiet_reader(tmp_path, sensors=lambda: {})

    assert reader.cpu_temperature() is None
    assert reader.read()["temperature_c"] is None


def test_heat_guard_pauses_at_the_high_mark_and_resumes_at_the_low_one():
    """Between the two thresholds the guard keeps its previous decision."""
    guard = HeatGuard(pause_at_c=80.0, resume_at_c=70.0)

    readings = [65.0, 79.9, 80.0, 75.0, 70.1, 70.0, 75.0, 79.0, 85.0]
    decisions = [guard.update(t) for t in readings]

    assert decisions == [False, False, True, True, True, False, False, False, True]


def test_heat_guard_keeps_its_decision_when_the_temperature_is_unknown():
    """A failed reading neither pauses a cool node nor resumes a hot one."""
    guard = HeatGuard(pause_at_c=80.0, resume_at_c=70.0)

    assert guard.update(None) is False
    assert guard.update(90.0) is True
    assert guard.update(None) is True


def test_heat_guard_rejects_a_resume_mark_above_the_pause_mark():
    """Inverted thresholds would make the guard flap; they are a config error."""
    with pytest.raises(ConfigError, match="resume_at_c"):
        HeatGuard(pause_at_c=70.0, resume_at_c=80.0)


def test_unknown_temperature_is_said_once(tmp_path, caplog):
    """A machine without any sensor gets one warning, not one per reading."""
    reader = quiet_reader(tmp_path, sensors=lambda: {})

    with caplog.at_level(logging.WARNING, logger="grbfl.health"):
        readings = [reader.cpu_temperature() for _ in range(3)]

    assert readings == [None, None, None]
    assert len(caplog.records) == 1
    assert "temperature is unknown" in caplog.records[0].getMessage()


def test_configured_thermal_file_follows_its_changes(tmp_path):
    """The file a config names is read afresh every time, as the daemon's heat
    guard needs when a board heats up and cools down."""
    zone = tmp_path / "temp"
    zone.write_text("90000\n")
    reader = HealthReader(thermal_file=zone, sensors=None, throttle_file=None)

    hot = reader.read()["temperature_c"]
    zone.write_text("50000\n")
    cool = reader.read()["temperature_c"]

    assert (hot, cool) == (90.0, 50.0)
