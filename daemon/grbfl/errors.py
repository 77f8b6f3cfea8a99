"""The package's exceptions: one root, subclasses that carry what went wrong."""

from __future__ import annotations


class GrbflError(Exception):
    """Root of every error grbfl raises on purpose."""


class ConfigError(GrbflError):
    """A configuration file or option is invalid; the message names file and key."""


class DataError(GrbflError):
    """A data folder or image file cannot be used."""


class WireError(GrbflError):
    """A message on the broker is malformed, too large or fails validation."""


class BrokerError(GrbflError):
    """The MQTT broker cannot be reached or started."""
