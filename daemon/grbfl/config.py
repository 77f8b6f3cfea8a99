"""Device configuration: one TOML file per device, validated once at start-up.

Every error names the file, the key (``section.key``) and what is allowed, so an
operator can fix a Pi's config from the journal alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ROLES = ("aggregator", "participant")
STRATEGIES = ("grbfl", "balls", "fedavg")
MODELS = ("cnn", "resnet18")

# MQTT topic levels may not hold wildcards or separators; keeping ids to a small
# alphabet also keeps them safe as file names and ACL patterns.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Class names are folder names: no separators, no control characters.
_CLASS_PATTERN = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,128}$")


@dataclass(frozen=True)
class NodeConfig:
    role: str
    id: str
    federation: str = "lab"


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30
    # Mosquitto's default limit is far above this; 256 KiB keeps a chunk quick to
    # resend on a Pi's Wi-Fi and well under any message_size_limit an operator sets.
    chunk_bytes: int = 262_144
    # Largest reassembled payload a node accepts; a ResNet-18 is about 45 MB.
    max_payload_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class DataConfig:
    dir: Path | None = None
    classes: tuple[str, ...] = ()
    # Relative paths under dir to use (the simulator hands out partitions this way).
    files_list: Path | None = None
    limit: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"
    seed: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    local_epochs: int = 1
    # Small local batches give each round more steps: on CIFAR-10 (3 participants,
    # 5 rounds) FedAvg reached 0.7296 at 16 against 0.7050 at 64, while one model
    # trained centrally reached 0.7633 at 16 and 0.7806 at 64 (README).
    batch_size: int = 16
    lr: float = 0.05
    # Random crops and mirror images; off for data that is not mirror-symmetric
    # (digits, text).
    augment: bool = True
    # "cosine": the aggregator lowers lr from round to round along a half cosine
    # and each round trains at a constant rate; "none": every round starts at lr
    # and decays to zero within the round.
    lr_decay: str = "cosine"
    # Steps at the start of each local training call that ramp lr up from zero;
    # a model fresh from averaging takes a full-rate step badly.
    warmup_steps: int = 100
    threads: int = 0


@dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 20
    deadline_s: float = 600.0
    min_participants: int = 1
    # The aggregator waits this long for min_participants to come online.
    start_timeout_s: float = 0.0


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "grbfl"
    n_clusters: int = 100
    variance_threshold: float = 0.03
    min_size: int = 5
    # grbfl's embedding balls: share only above this fraction of a class's spread.
    # Embeddings have no fixed scale, so this is relative; 0 keeps every ball of
    # at least min_size members, which measured best (README, results).
    embedding_variance_threshold: float = 0.0
    # grbfl's class shapes: directions per class along which embeddings stray
    # together (shapes.py); 0 sends none, for balls alone.
    shape_rank: int = 16
    # Synthetic samples the aggregator draws from the merged balls per epoch.
    server_samples: int = 20_000
    server_epochs: int = 5


@dataclass(frozen=True)
class HealthConfig:
    pause_at_c: float = 80.0
    resume_at_c: float = 70.0
    interval_s: float = 10.0
    # A file holding the CPU temperature in millidegrees C, as the kernel's
    # thermal zones do; read instead of searching psutil's sensors, for boards
    # whose CPU sensor is not the first zone.
    temperature_file: Path | None = None


@dataclass(frozen=True)
class StateConfig:
    dir: Path = Path("/var/lib/grbfl")


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    state: StateConfig = field(default_factory=StateConfig)
    source: str = "<memory>"


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "broker": BrokerConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "rounds": RoundsConfig,
    "strategy": StrategyConfig,
    "health": HealthConfig,
    "state": StateConfig,
}

# (minimum, maximum) for numbers; None means unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "broker.port": (1, 65535),
    "broker.keepalive": (5, 3600),
    "broker.chunk_bytes": (1024, 256 * 1024 * 1024),
    "broker.max_payload_bytes": (1024, 2**31),
    "data.limit": (0, None),
    "training.local_epochs": (1, 1000),
    "training.batch_size": (1, 65536),
    "training.lr": (1e-8, 10.0),
    "training.threads": (0, 1024),
    "training.warmup_steps": (0, 1_000_000),
    "rounds.rounds": (1, 1_000_000),
    "rounds.deadline_s": (1.0, 7 * 86400.0),
    "rounds.min_participants": (1, 100_000),
    "rounds.start_timeout_s": (0.0, None),
    "strategy.n_clusters": (1, 1_000_000),
    "strategy.variance_threshold": (0.0, None),
    "strategy.embedding_variance_threshold": (0.0, 10.0),
    "strategy.shape_rank": (0, 64),  # shapes.MAX_SHAPE_RANK
    "strategy.min_size": (1, 1_000_000),
    "strategy.server_samples": (10, 10_000_000),
    "strategy.server_epochs": (1, 1000),
    "health.pause_at_c": (20.0, 150.0),
    "health.resume_at_c": (0.0, 150.0),
    "health.interval_s": (0.5, 3600.0),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "node.role": ROLES,
    "model.name": MODELS,
    "training.lr_decay": ("cosine", "none"),
    "strategy.name": STRATEGIES,
}


def _coerce(source: str, key: str, value: Any, annotation: str) -> Any:
    """Check one value against its dataclass annotation and convert it."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {key} = {value!r} is not allowed: expected {expected}"
        )

    if "Path" in annotation:
        if not isinstance(value, str) or not value:
            raise fail("a non-empty path string")
        return Path(value).expanduser()
    if annotation.startswith("tuple"):
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v for v in value
        ):
            raise fail("a list of non-empty strings")
        if len(set(value)) != len(value):
            raise fail("a list without duplicates")
        return tuple(value)
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        if not math.isfinite(value):
            raise fail("a finite number")
        return float(value)
    raise fail(annotation)  # pragma: no cover - a field type this module lacks


def _build_section(source: str, name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {name}.{unknown[0]}; "
            f"[{name}] allows: {', '.join(sorted(fields))}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        converted = _coerce(source, full, value, str(fields[key].type))
        if full in _CHOICES and converted not in _CHOICES[full]:
            raise ConfigError(
                f"{source}: {full} = {value!r} is not allowed: "
                f"choose one of {', '.join(_CHOICES[full])}"
            )
        if full in _RANGES:
            low, high = _RANGES[full]
            if (low is not None and converted < low) or (
                high is not None and converted > high
            ):
                bounds = (
                    f"between {low} and {high}"
                    if high is not None
                    else (f"at least {low}")
                )
                raise ConfigError(
                    f"{source}: {full} = {value!r} is out of range: {bounds}"
                )
        values[key] = converted
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise ConfigError(f"{source}: missing key {name}.{missing[0]}")
    return cls(**values)


def config_from_dict(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document and build the frozen configuration."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]; "
            f"allowed: {', '.join(f'[{s}]' for s in _SECTIONS)}"
        )
    if "node" not in raw:
        raise ConfigError(f"{source}: missing section [node] (role and id)")
    sections = {
        name: _build_section(source, name, table) for name, table in raw.items()
    }
    config = Config(source=source, **sections)
    _check_relations(config)
    return config


def _check_relations(config: Config) -> None:
    """Checks that involve more than one key."""
    source = config.source
    for key, value in (
        ("node.id", config.node.id),
        ("node.federation", config.node.federation),
    ):
        if not _ID_PATTERN.match(value):
            raise ConfigError(
                f"{source}: {key} = {value!r} is not allowed: use 1-64 letters, "
                "digits, '_', '.' or '-', starting with a letter or digit"
            )
    if not config.data.classes:
        raise ConfigError(
            f"{source}: missing key data.classes: the federation's class list, "
            'e.g. ["airplane", "automobile", ...], the same on every device'
        )
    if config.data.dir is None:
        raise ConfigError(
            f"{source}: missing key data.dir (the "
            + ("test images" if config.node.role == "aggregator" else "local images")
            + " folder)"
        )
    for name in config.data.classes:
        if not _CLASS_PATTERN.match(name) or name in (".", ".."):
            raise ConfigError(
                f"{source}: data.classes has {name!r}: a class is a folder name "
                "directly under data.dir, without '/' or control characters"
            )
    if not config.broker.host.strip():
        raise ConfigError(f"{source}: broker.host is empty: name the broker's host")
    if config.broker.max_payload_bytes < config.broker.chunk_bytes:
        raise ConfigError(
            f"{source}: broker.max_payload_bytes = {config.broker.max_payload_bytes} "
            f"must be at least broker.chunk_bytes = {config.broker.chunk_bytes}"
        )
    if config.health.resume_at_c >= config.health.pause_at_c:
        raise ConfigError(
            f"{source}: health.resume_at_c = {config.health.resume_at_c} must be "
            f"below health.pause_at_c = {config.health.pause_at_c}"
        )
    tls = (config.broker.tls_cert, config.broker.tls_key)
    if (tls[0] is None) != (tls[1] is None):
        raise ConfigError(
            f"{source}: broker.tls_cert and broker.tls_key must be given together"
        )
    for key, path in (
        ("broker.tls_ca", config.broker.tls_ca),
        ("broker.tls_cert", config.broker.tls_cert),
        ("broker.tls_key", config.broker.tls_key),
        ("health.temperature_file", config.health.temperature_file),
    ):
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: {key} = '{path}': no such file")
    if (config.broker.username is None) != (config.broker.password is None):
        raise ConfigError(
            f"{source}: broker.username and broker.password must be given together"
        )


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return config_from_dict(raw, source=str(path))


def config_to_dict(config: Config) -> dict[str, Any]:
    """The inverse of config_from_dict, for writing generated configs."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            table[f.name] = value
        out[name] = table
    return out


def dump_toml(data: dict[str, Any]) -> str:
    """Write the flat two-level TOML this module reads (no dependency needed)."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
