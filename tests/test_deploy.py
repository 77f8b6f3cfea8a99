"""The deployment files: systemd unit, Ansible playbook, and the broker's ACL.

The ACL tests render the role's Jinja templates directly, the way Ansible would, and
the broker test runs a real Mosquitto with the rendered files to show that the
broker, not just the file, refuses a participant's writes to aggregator topics.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2 import meta
from jinja2.nativetypes import NativeEnvironment

from grbfl.config import BrokerConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "grbfl.service"
ANSIBLE = REPO / "ansible"
ROLES = ANSIBLE / "roles"

# systemd-analyze security scores grbfl.service 1.1 with systemd 252; newer versions
# add checks, so allow a little headroom before calling it a regression.
MAX_EXPOSURE = 1.5

FED = "lab"
PASSWORDS = {
    "server": "agg-secret",
    "pi1": "pi1-secret",
    "pi2": "pi2-secret",
    "operator": "op-secret",
}
GROUPS = {"aggregator": ["server"], "participants": ["pi1", "pi2"]}

BROKER_START_TIMEOUT_S = 5.0
MESSAGE_TIMEOUT_S = 5.0


# --- helpers --------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A command from the venv running the tests, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def tool_env() -> dict[str, str]:
    """PATH with the venv first, as ansible-lint expects when it runs ansible."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _to_bool(value: Any) -> bool:
    """Ansible's bool filter."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("yes", "on", "true", "1")


def ansible_like_env(role: str, *, native: bool = False) -> jinja2.Environment:
    """A Jinja environment with Ansible's template settings and the filters we use.

    ``native`` renders a lone expression to a Python value, as Ansible does for
    variables, so that a default like ``{{ groups['x'] }}`` stays a list.
    """
    cls = NativeEnvironment if native else jinja2.Environment
    env = cls(
        loader=jinja2.FileSystemLoader(ROLES / role / "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["bool"] = _to_bool
    env.filters["to_json"] = json.dumps
    return env


def role_variables(role: str) -> dict[str, Any]:
    """A role's defaults and vars, as Ansible would merge them (vars win)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with ansible-core)")
    merged: dict[str, Any] = {}
    for part in ("defaults", "vars"):
        path = ROLES / role / part / "main.yml"
        if path.exists():
            merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def render(role: str, template: str, **overrides: Any) -> str:
    """Render a role template with its defaults, resolving templated defaults."""
    env = ansible_like_env(role)
    native = ansible_like_env(role, native=True)
    variables = {
        "groups": GROUPS,
        "inventory_hostname": "pi1",
        "playbook_dir": str(ANSIBLE),
        "grbfl_federation": FED,
        "grbfl_broker_passwords": PASSWORDS,
        **role_variables(role),
        **overrides,
    }
    source = (ROLES / role / "templates" / template).read_text()
    resolved: dict[str, Any] = {}

    def visit(name: str, trail: tuple[str, ...] = ()) -> None:
        if name in resolved or name not in variables:
            return
        assert name not in trail, f"variables refer to each other: {trail}"
        value = variables[name]
        if isinstance(value, str) and "{{" in value:
            for dep in meta.find_undeclared_variables(env.parse(value)):
                visit(dep, (*trail, name))
            value = native.from_string(value).render(resolved)
        resolved[name] = value

    for name in meta.find_undeclared_variables(env.parse(source)):
        visit(name)
    return env.get_template(template).render(resolved)


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """Mosquitto ACL text as {user: [(access, topic filter), ...]}."""
    rules: dict[str, list[tuple[str, str]]] = {}
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            user = rest
            rules.setdefault(user, [])
        elif keyword == "topic":
            assert user is not None, f"rule for anonymous clients: {line!r}"
            access, _, topic = rest.partition(" ")
            rules[user].append((access, topic) if topic else ("readwrite", access))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return rules


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; 'a/#' also matches 'a', as in Mosquitto."""
    levels = topic.split("/")
    for i, part in enumerate(topic_filter.split("/")):
        if part == "#":
            return True
        if i >= len(levels) or part not in ("+", levels[i]):
            return False
    return len(topic_filter.split("/")) == len(levels)


def allowed(
    rules: dict[str, list[tuple[str, str]]], user: str, access: str, topic: str
) -> bool:
    """Whether the ACL grants user this access ("read" or "write") on topic."""
    return any(
        kind in (access, "readwrite") and topic_matches(pattern, topic)
        for kind, pattern in rules.get(user, [])
    )


def t(suffix: str) -> str:
    """A topic of the test federation."""
    return f"grbfl/{FED}/{suffix}"


AGGREGATOR_ONLY = ["run", "model", "model/0", "model/12", "metrics"]


# --- systemd unit ---------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (package systemd)",
)


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """With ExecStart pointed at /bin/true, verify finds nothing wrong in the unit."""
    text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text())
    copy = tmp_path / "grbfl.service"
    copy.write_text(text)

    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
    )

    complaints = [line for line in result.stderr.splitlines() if "grbfl" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


@needs_systemd_analyze
def test_real_unit_parses_and_only_lacks_the_installed_daemon(tmp_path):
    """The shipped file itself: its only complaint may be the missing venv binary."""
    copy = tmp_path / "grbfl.service"
    shutil.copy(UNIT, copy)

    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
    )

    complaints = [line for line in result.stderr.splitlines() if "grbfl" in line]
    unexpected = [c for c in complaints if "/opt/grbfl/venv/bin/grbfl" not in c]
    assert unexpected == []
    assert result.returncode == 0 or complaints, result.stderr


@needs_systemd_analyze
def test_unit_exposure_score_stays_low():
    """systemd-analyze security keeps rating the hardening as it was measured."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    if "offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")

    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_unit_is_a_notify_service_with_watchdog_and_state_directory():
    """The life-cycle settings the daemon's code relies on are in the unit."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())

    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["60"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectory"] == ["grbfl"]
    assert settings["User"] == ["grbfl"]
    assert settings["ExecStart"] == [
        "/opt/grbfl/venv/bin/grbfl run --config /etc/grbfl/grbfl.toml"
    ]
    assert "MemoryDenyWriteExecute" not in settings  # breaks torch's oneDNN kernels


# --- Ansible --------------------------------------------------------------------------


def test_playbook_passes_syntax_check():
    """ansible-playbook accepts site.yml with the example inventory."""
    playbook = tool("ansible-playbook")
    if playbook is None:
        pytest.skip("ansible-core is not installed (pip install ansible-core)")

    result = subprocess.run(
        [
            playbook,
            "-i",
            str(ANSIBLE / "inventory.example.ini"),
            str(ANSIBLE / "site.yml"),
            "--syntax-check",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=tool_env(),
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_passes_with_the_production_profile():
    """The playbook and roles meet ansible-lint's strictest profile."""
    lint = tool("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint is not installed (pip install ansible-lint)")

    result = subprocess.run(
        [lint, "--offline", "--profile", "production", "--nocolor", "ansible/"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=tool_env(),
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- the broker's ACL, rendered -------------------------------------------------------


@pytest.fixture
def acl() -> dict[str, list[tuple[str, str]]]:
    """The ACL the broker role writes for the test inventory."""
    return parse_acl(render("broker", "grbfl.acl.j2"))


@pytest.mark.parametrize("suffix", AGGREGATOR_ONLY)
def test_acl_grants_a_participant_no_write_on_aggregator_topics(acl, suffix):
    """run, model and metrics are the aggregator's alone."""
    assert not allowed(acl, "pi1", "write", t(suffix))


@pytest.mark.parametrize("suffix", AGGREGATOR_ONLY)
def test_acl_lets_only_the_aggregator_write_its_topics(acl, suffix):
    """Of every user in the ACL, only the aggregator may write run, model, metrics."""
    writers = {user for user in acl if allowed(acl, user, "write", t(suffix))}

    assert writers == {"server"}


def test_acl_keeps_each_participant_to_its_own_topics(acl):
    """A participant writes its own updates (chunks too) and status, nobody else's."""
    own = ["updates/pi1", "updates/pi1/0", "updates/pi1/17", "nodes/pi1/status"]
    others = ["updates/pi2", "updates/pi2/0", "nodes/pi2/status", "nodes/server/health"]

    assert all(allowed(acl, "pi1", "write", t(s)) for s in own)
    assert not any(allowed(acl, "pi1", "write", t(s)) for s in others)
    assert not allowed(acl, "pi1", "write", "grbfl/other/updates/pi1")


def test_acl_operator_is_read_only(acl):
    """The operator account can watch everything and publish nothing."""
    assert allowed(acl, "operator", "read", t("updates/pi1"))
    assert [rule for rule in acl["operator"] if rule[0] != "read"] == []


def test_acl_hides_peer_updates_from_participants_unless_asked(acl):
    """By default a participant reads run and model but not another's update."""
    assert allowed(acl, "pi1", "read", t("run"))
    assert allowed(acl, "pi1", "read", t("model/3"))
    assert not allowed(acl, "pi1", "read", t("updates/pi2"))

    opened = parse_acl(
        render("broker", "grbfl.acl.j2", broker_participants_read_updates=True)
    )
    assert allowed(opened, "pi1", "read", t("updates/pi2"))
    assert not allowed(opened, "pi1", "write", t("run"))


def test_broker_packet_limit_fits_the_daemons_chunks():
    """max_packet_size leaves room above the chunk size the daemons use by default."""
    conf = render("broker", "grbfl.conf.j2")

    limit = int(re.search(r"(?m)^max_packet_size (\d+)$", conf).group(1))
    assert limit > BrokerConfig().chunk_bytes
    assert re.search(r"(?m)^message_size_limit", conf) is None  # deprecated


# --- the daemon's config, rendered ----------------------------------------------------


@pytest.mark.parametrize("role", ["aggregator", "participant"])
def test_daemon_config_template_is_accepted_by_the_daemon(role):
    """The rendered grbfl.toml passes the daemon's own validation for both roles."""
    node = "server" if role == "aggregator" else "pi1"
    awkward = 'p"ass\\word with spaces'

    text = render(
        "daemon",
        "grbfl.toml.j2",
        daemon_role=role,
        inventory_hostname=node,
        grbfl_broker_passwords={**PASSWORDS, node: awkward},
    )
    config = config_from_dict(tomllib.loads(text), source="grbfl.toml.j2")

    assert config.node.role == role
    assert config.node.id == node
    assert config.broker.username == node
    assert config.broker.password == awkward
    assert config.data.dir.name == ("test" if role == "aggregator" else "train")
    assert len(config.data.classes) == 10


# --- a real Mosquitto with the rendered files -----------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def acl_broker(tmp_path) -> Iterator[int]:
    """Mosquitto on loopback with the role's conf, ACL and hashed passwords."""
    for binary in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            pytest.skip(f"{binary} is not installed (apt install mosquitto)")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    passwd = tmp_path / "passwd"
    acl_file = tmp_path / "acl"
    conf = tmp_path / "mosquitto.conf"

    # Prepare the three files the role would install.
    for user, password in PASSWORDS.items():
        create = ["-c"] if not passwd.exists() else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    acl_file.write_text(render("broker", "grbfl.acl.j2"))
    conf_text = render(
        "broker",
        "grbfl.conf.j2",
        broker_port=port,
        broker_listen_address="127.0.0.1",
        broker_password_file=str(passwd),
        broker_acl_file=str(acl_file),
        broker_persistence=False,
    )
    # Started as root, Mosquitto would switch to its own user, which cannot read
    # pytest's private tmp_path; stay the user running the tests.
    me = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(conf_text + f"user {me}\n")

    # Start it and wait until it accepts connections.
    proc = subprocess.Popen(
        [mosquitto, "-c", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0]
                pytest.fail(f"mosquitto did not start:\n{out}")
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=5)


class Recorder:
    """A paho client that records every message it receives."""

    def __init__(self, port: int, user: str, topics: Iterable[str]) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-rec"
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_connected(self.client)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        # A round trip through the broker: once it acknowledges this publish, the
        # subscriptions sent before it on the same connection are in place.
        self.client.publish("grbfl/none", b"", qos=1).wait_for_publish(
            MESSAGE_TIMEOUT_S
        )

    def _on_message(self, client, userdata, message) -> None:
        with self.arrived:
            self.messages.append((message.topic, bytes(message.payload)))
            self.arrived.notify_all()

    def wait_for(self, topic: str) -> None:
        """Block until a message on topic has arrived."""
        with self.arrived:
            ok = self.arrived.wait_for(
                lambda: any(tp == topic for tp, _ in self.messages), MESSAGE_TIMEOUT_S
            )
        assert ok, f"no message on {topic}; got {self.messages}"

    def topics(self) -> list[str]:
        with self.arrived:
            return [tp for tp, _ in self.messages]

    def payloads(self) -> list[bytes]:
        with self.arrived:
            return [body for _, body in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(port: int, user: str):
    """A connected paho client for user."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}")
    client.username_pw_set(user, PASSWORDS[user])
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_connected(client)
    return client


def wait_connected(client) -> None:
    """Block until the broker accepted the client's CONNECT."""
    deadline = time.monotonic() + MESSAGE_TIMEOUT_S
    while not client.is_connected():
        assert time.monotonic() < deadline, "client did not connect"
        time.sleep(0.01)


def publish_all(client, topics: Iterable[str], payload: bytes = b"x") -> None:
    """Publish one QoS 1 message per topic and wait until the broker took each."""
    for topic in topics:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(MESSAGE_TIMEOUT_S)
        assert info.is_published()


@pytest.mark.broker
def test_broker_drops_participant_writes_to_aggregator_topics(acl_broker):
    """Mosquitto delivers a participant's own update but none of its forged writes."""
    pytest.importorskip("paho.mqtt.client")
    watcher = Recorder(acl_broker, "operator", [t("#")])
    forger = publisher(acl_broker, "pi1")
    aggregator = publisher(acl_broker, "server")
    try:
        # Forged writes first; QoS 1 from one client arrives in order, so once the
        # last allowed message is seen, any forged one would have been seen before.
        forged = [t(s) for s in AGGREGATOR_ONLY] + [t("updates/pi2"), t("nodes/pi2/x")]
        own = [t("updates/pi1"), t("updates/pi1/0"), t("nodes/pi1/status")]
        publish_all(forger, forged, b"forged")
        publish_all(forger, own, b"own")
        publish_all(aggregator, [t("run")], b"aggregator")
        watcher.wait_for(t("nodes/pi1/status"))
        watcher.wait_for(t("run"))

        assert b"forged" not in watcher.payloads()
        assert [tp for tp, body in watcher.messages if body == b"own"] == own
        assert [tp for tp, body in watcher.messages if body == b"aggregator"] == [
            t("run")
        ]
    finally:
        for client in (forger, aggregator):
            client.disconnect()
            client.loop_stop()
        watcher.close()


@pytest.mark.broker
def test_broker_keeps_one_participants_update_from_another(acl_broker):
    """pi2 subscribed to every update still receives only what it may read."""
    pytest.importorskip("paho.mqtt.client")
    peer = Recorder(acl_broker, "pi2", [t("updates/#"), t("run")])
    sender = publisher(acl_broker, "pi1")
    aggregator = publisher(acl_broker, "server")
    try:
        publish_all(sender, [t("updates/pi1")])
        publish_all(aggregator, [t("run")])
        peer.wait_for(t("run"))

        assert t("updates/pi1") not in peer.topics()
    finally:
        for client in (sender, aggregator):
            client.disconnect()
            client.loop_stop()
        peer.close()
