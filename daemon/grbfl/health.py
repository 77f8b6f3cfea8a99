"""Device health: temperature, Raspberry Pi throttling, CPU and memory.

A Raspberry Pi 5 training for minutes gets hot; past about 80 C its firmware lowers the
clock, and a weak power supply makes it under-volt. Each node publishes these readings
on ``nodes/<node>/health`` and a participant pauses while :class:`HeatGuard` says it is
too hot. Every reading that a machine cannot give is None, never an exception.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from grbfl.errors import ConfigError

_LOGGER = logging.getLogger(__name__)

# Where the Pi firmware driver publishes the get_throttled word (hex, no prefix). The
# node's name depends on the board's device tree, hence the patterns after the first.
THROTTLE_FILE_CANDIDATES = (
    "/sys/devices/platform/soc/soc:firmware/get_throttled",
    "/sys/devices/platform/soc*/soc*:firmware/get_throttled",
    "/sys/devices/platform/*firmware*/get_throttled",
)
THERMAL_ZONE_FILE = "/sys/class/thermal/thermal_zone0/temp"

# psutil sensor names, best first: the Pi's SoC zone, then common x86 packages.
PREFERRED_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "zenpower", "soc_thermal")

# vcgencmd talks to the firmware through /dev/vcio; it answers in milliseconds or not
# at all (PrivateDevices= hides the device), so a short timeout is enough.
VCGENCMD_TIMEOUT_S = 2.0

# Bits of the firmware's get_throttled word: the low half is "now", the same flags
# shifted by 16 are "has happened since boot".
THROTTLE_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}
SINCE_BOOT_SHIFT = 16

SensorReader = Callable[[], Mapping[str, Sequence[Any]]]

# psutil has no sensors_temperatures() on some platforms (macOS, Windows).
_PSUTIL_SENSORS: SensorReader | None = getattr(psutil, "sensors_temperatures", None)

# Stands for "look for it on this machine" in HealthReader's arguments.
AUTO = "auto"


def decode_throttled(word: int) -> dict[str, Any]:
    """Split the firmware's get_throttled word into named flags, now and since boot."""
    return {
        "raw": f"0x{word:x}",
        "now": {name: bool(word >> bit & 1) for name, bit in THROTTLE_BITS.items()},
        "since_boot": {
            name: bool(word >> (bit + SINCE_BOOT_SHIFT) & 1)
            for name, bit in THROTTLE_BITS.items()
        },
    }


def parse_throttled(text: str) -> int:
    """Read the word from ``50005`` (sysfs) or ``throttled=0x50005`` (vcgencmd)."""
    value = text.strip().rpartition("=")[2]
    return int(value, 16)


class HealthReader:
    """Reads health from configurable sources; the defaults are the real machine's.

    Each source can be replaced (tests point them at files in a temporary folder) or
    switched off with None; ``AUTO`` looks for the Pi's throttle file and vcgencmd.
    Sources that fail are reported once at WARNING and then skipped for good, so a
    daemon reading health every few seconds does not fill the journal.
    """

    def __init__(
        self,
        *,
        thermal_file: str | os.PathLike[str] | None = THERMAL_ZONE_FILE,
        throttle_file: str | os.PathLike[str] | None = AUTO,
        vcgencmd: str | None = AUTO,
        sensors: SensorReader | None = _PSUTIL_SENSORS,
    ) -> None:
        self._thermal_file = Path(thermal_file) if thermal_file else None
        if throttle_file == AUTO:
            self._throttle_file = _find_throttle_file()
        else:
            self._throttle_file = Path(throttle_file) if throttle_file else None
        self._vcgencmd = shutil.which("vcgencmd") if vcgencmd == AUTO else vcgencmd
        self._sensors = sensors
        self._broken: set[str] = set()
        self._said_unknown = False

    def read(self) -> dict[str, Any]:
        """Return one JSON-serialisable snapshot of the device's health."""
        memory = psutil.virtual_memory()
        return {
            "temperature_c": self.cpu_temperature(),
            "throttle": self.throttle(),
            "cpu_freq_mhz": _cpu_freq_mhz(),
            "load_avg": [round(x, 2) for x in psutil.getloadavg()],
            # Since the previous call; the first call of a process reads 0.0.
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory": {
                "used_bytes": int(memory.used),
                "available_bytes": int(memory.available),
                "percent": float(memory.percent),
            },
        }

    def cpu_temperature(self) -> float | None:
        """CPU temperature in degrees C from psutil, else the first thermal zone."""
        if self._sensors is not None and "sensors" not in self._broken:
            try:
                temps = self._sensors()
            except (OSError, RuntimeError) as exc:
                self._give_up("sensors", exc)
            else:
                temp = _pick_sensor(temps)
                if temp is not None:
                    return temp
        if self._thermal_file is not None and "thermal" not in self._broken:
            try:
                millis = int(self._thermal_file.read_text().strip())
            except FileNotFoundError:
                self._broken.add("thermal")  # no such zone here: nothing to say
            except (OSError, ValueError) as exc:
                self._give_up("thermal", exc)
            else:
                return round(millis / 1000.0, 1)
        if not self._said_unknown:
            self._said_unknown = True
            _LOGGER.warning(
                "no readable CPU temperature sensor: temperature is unknown, so "
                "the heat guard cannot pause this node"
            )
        return None

    def throttle(self) -> dict[str, Any] | None:
        """Decoded Pi throttle flags, or None on a machine without the firmware."""
        if self._throttle_file is not None and "throttle_file" not in self._broken:
            try:
                return decode_throttled(
                    parse_throttled(self._throttle_file.read_text())
                )
            except (OSError, ValueError) as exc:
                self._give_up("throttle_file", exc)
        if self._vcgencmd is not None and "vcgencmd" not in self._broken:
            try:
                result = subprocess.run(
                    [self._vcgencmd, "get_throttled"],
                    capture_output=True,
                    text=True,
                    timeout=VCGENCMD_TIMEOUT_S,
                    check=True,
                )
                return decode_throttled(parse_throttled(result.stdout))
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self._give_up("vcgencmd", exc)
        return None

    def _give_up(self, source: str, exc: BaseException) -> None:
        """Stop using a source that failed, saying so once."""
        self._broken.add(source)
        _LOGGER.warning("health source %s unusable, skipping it: %s", source, exc)


def _find_throttle_file() -> Path | None:
    """The firmware's get_throttled file on a Raspberry Pi, None elsewhere."""
    for pattern in THROTTLE_FILE_CANDIDATES:
        matches = sorted(glob.glob(pattern))
        if matches:
            return Path(matches[0])
    return None


def _pick_sensor(temps: Mapping[str, Sequence[Any]]) -> float | None:
    """The most CPU-like reading among psutil's sensors, None when there is none."""
    names = [n for n in PREFERRED_SENSORS if temps.get(n)] or [
        n for n, entries in temps.items() if entries
    ]
    for name in names:
        current = getattr(temps[name][0], "current", None)
        if current is not None:
            return round(float(current), 1)
    return None


def _cpu_freq_mhz() -> float | None:
    """Current CPU frequency in MHz, None where the kernel does not expose it."""
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        return None
    if freq is None or not freq.current:
        return None
    return round(float(freq.current), 1)


_DEFAULT_READER: HealthReader | None = None


def read_health() -> dict[str, Any]:
    """One health snapshot of this machine, for ``nodes/<node>/health``."""
    global _DEFAULT_READER
    if _DEFAULT_READER is None:
        _DEFAULT_READER = HealthReader()
    return _DEFAULT_READER.read()


class HeatGuard:
    """Decides whether a node is too hot to train, with hysteresis.

    It trips at ``pause_at_c`` and clears only once the temperature falls to
    ``resume_at_c``, so a board hovering around one threshold does not flap between
    paused and training every reading. An unknown temperature keeps the last decision.
    """

    def __init__(self, pause_at_c: float, resume_at_c: float) -> None:
        if not resume_at_c < pause_at_c:
            message = (
                f"[health] resume_at_c ({resume_at_c}) must be below "
                f"pause_at_c ({pause_at_c})"
            )
            raise ConfigError(message)
        self.pause_at_c = pause_at_c
        self.resume_at_c = resume_at_c
        self.hot = False

    def update(self, temp_c: float | None) -> bool:
        """Feed one reading; return True while the node should stay paused."""
        if temp_c is None:
            return self.hot
        if self.hot and temp_c <= self.resume_at_c:
            self.hot = False
        elif not self.hot and temp_c >= self.pause_at_c:
            self.hot = True
        return self.hot
