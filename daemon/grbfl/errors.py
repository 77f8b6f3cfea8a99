"""The package's exceptions: one root, subclasses that carry what went wrong."""

from __future__ import annotations


class GrbflError(Exception):
    """Root of every error grbfl raises on purpose."""


class ConfigError(GrbflError):
    """A configuration file or option is invalid; the message names file and key."""


class UsageError(GrbflError):
    """A command-line option cannot be used as given (exit 2, as argparse's)."""


class DataError(GrbflError):
    """A data folder or image file cannot be used."""


class WireError(GrbflError):
    """A message on the broker is malformed, too large or fails validation."""


class BrokerError(GrbflError):
    """The MQTT broker cannot be reached or started."""


class BrokerLimitError(BrokerError):
    """A message is larger than the broker takes; it was not (or not wholly) sent.

    ``size`` is the message's size in bytes; ``limit`` the broker's announced
    maximum packet size, or None when the broker refused without saying its limit.
    """

    def __init__(self, message: str, *, size: int, limit: int | None) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class PayloadTooLarge(WireError):
    """A transfer announces more bytes than the receiver accepts.

    Carries the transfer id, so that its later parts can be dropped quietly.
    """

    def __init__(self, message: str, *, xfer: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.xfer = xfer
        self.size = size
        self.limit = limit
