"""grbfl: granular-ball federated learning for a home lab."""

__version__ = "0.1.0"
