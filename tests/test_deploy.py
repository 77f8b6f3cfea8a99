"""The deployment files: systemd unit, Ansible playbook, and the broker's ACL.

The ACL tests render the role's Jinja templates directly, the way Ansible would, and
the broker test runs a real Mosquitto with the rendered files to show that the
broker, not just the file, refuses a participant's writes to aggregator topics.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import pwd
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


# Every unit shipped, so that a unit added later is checked too.
UNITS = sorted((REPO / "systemd").glob("*.service"))


def verify(unit: Path, env: dict[str, str] | None = None) -> list[str]:
    """systemd-analyze verify's complaints about this unit and its drop-ins."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    # Other units installed on this machine may draw complaints of their own.
    complaints = [
        line
        for line in result.stderr.splitlines()
        if str(unit.parent) in line or unit.name in line
    ]
    assert result.returncode == 0 or complaints, result.stderr
    return complaints


def runnable_copy(unit: Path, folder: Path) -> Path:
    """The unit with ExecStart pointed at /bin/true, which exists everywhere."""
    copy = folder / unit.name
    copy.write_text(
        re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit.read_text())
    )
    return copy


def installed_unit() -> Path:
    """The unit file the daemon role copies to every host, participants included."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with ansible-core)")
    tasks = yaml.safe_load((ROLES / "daemon" / "tasks" / "main.yml").read_text())
    (task,) = [t for t in tasks if t["name"] == "Install the systemd unit"]
    copy = task["ansible.builtin.copy"]
    assert copy["dest"] == "/etc/systemd/system/grbfl.service"
    return REPO / copy["src"].partition("}}/")[2]


def test_the_daemon_role_installs_the_one_unit_for_both_roles():
    """One unit serves aggregator and participants (the role comes from the config);
    the role installs it, and no other unit sits unused in systemd/."""
    unit = installed_unit()

    assert [unit] == UNITS
    assert "--config /etc/grbfl/grbfl.toml" in unit.read_text()


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path, unit):
    """With ExecStart pointed at /bin/true, verify finds nothing at all to say."""
    assert verify(runnable_copy(unit, tmp_path)) == []


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_real_unit_parses_and_only_lacks_the_installed_daemon(tmp_path, unit):
    """The shipped file itself: its only complaint may be the missing venv binary."""
    copy = tmp_path / unit.name
    shutil.copy(unit, copy)

    complaints = verify(copy)

    assert [c for c in complaints if "/opt/grbfl/venv/bin/grbfl" not in c] == []


@needs_systemd_analyze
def test_unit_with_the_ip_allow_list_drop_in_passes_verify(tmp_path):
    """The drop-in the daemon role writes for a broker elsewhere is valid too."""
    unit = runnable_copy(installed_unit(), tmp_path)
    drop_in = tmp_path / f"{unit.name}.d" / "ip-access.conf"
    drop_in.parent.mkdir()
    drop_in.write_text(
        render(
            "daemon",
            "ip-access.conf.j2",
            daemon_ip_address_allow=["203.0.113.0/24", "2001:db8::/32"],
        )
    )

    # SYSTEMD_UNIT_PATH makes verify read drop-ins beside the unit.
    complaints = verify(unit, {"SYSTEMD_UNIT_PATH": f"{tmp_path}:"})

    assert complaints == []
    assert "IPAddressAllow=203.0.113.0/24 2001:db8::/32" in drop_in.read_text()


@needs_systemd_analyze
def test_participant_unit_exposure_is_at_most_4():
    """systemd-analyze security rates the unit participants run at 4.0 or lower,
    and no worse than measured (a little headroom for newer systemd's checks)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager"]
        + [str(installed_unit())],
        capture_output=True,
        text=True,
    )
    if "offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")

    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 4.0
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


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the plays use become and chown files to mosquitto: run as root",
)


def local_inventory(folder: Path, python: str) -> Path:
    """The test federation's hosts, every one of them this machine."""
    lines = []
    for group, hosts in {"broker": ["server"], **GROUPS}.items():
        lines.append(f"[{group}]")
        lines += [f"{host} ansible_connection=local" for host in hosts]
    lines += ["[all:vars]", f"ansible_python_interpreter={python}"]
    path = folder / "inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_playbook(
    folder: Path, inventory: Path, playbook: Path, variables: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook with extra variables, its temporary files kept in folder."""
    binary = tool("ansible-playbook")
    if binary is None:
        pytest.skip("ansible-core is not installed (pip install ansible-core)")
    extra = folder / "extra-vars.json"
    extra.write_text(json.dumps(variables))
    env = {
        **tool_env(),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_LOCAL_TEMP": str(folder / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(folder / "ansible-remote"),
    }
    return subprocess.run(
        [binary, "-i", str(inventory), str(playbook), "-e", f"@{extra}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host, e.g. {"pi1": {"changed": 3, "failed": 0}}."""
    hosts = {}
    for host, counters in re.findall(r"(?m)^(\S+)\s+: (ok=.*)$", output):
        hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    assert hosts, output
    return hosts


@needs_root
def test_playbook_check_mode_against_localhost_fails_no_task(tmp_path):
    """`--check --diff` of site.yml, broker, aggregator and participant all on this
    machine: every task of both roles runs in check mode and none fails."""
    try:
        subprocess.run(["/usr/bin/python3", "-c", "import apt"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the apt module needs python3-apt in /usr/bin/python3 (Debian)")
    inventory = local_inventory(tmp_path, "/usr/bin/python3")
    variables = {"grbfl_federation": FED, "grbfl_broker_passwords": PASSWORDS}

    result = run_playbook(
        tmp_path, inventory, ANSIBLE / "site.yml", variables, "--check", "--diff"
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    counters = recap(result.stdout)
    assert set(counters) == {"server", "pi1", "pi2"}
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in counters.values())
    # Both roles got as far as their templates, which check mode renders.
    assert "TASK [broker : Write the topic ACL]" in result.stdout
    assert "TASK [daemon : Write the daemon configuration]" in result.stdout


@needs_root
def test_broker_role_second_run_changes_nothing(tmp_path):
    """The broker role for real, its files sent to tmp_path: the first run writes
    the password file, ACL, config and TLS files, the second changes nothing, and
    what it wrote is what this file's own rendering (used below) produces."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (apt install mosquitto)")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user (apt install mosquitto)")
    tls = make_tls_files(tmp_path / "controller")
    files = {
        "broker_password_file": str(tmp_path / "grbfl.passwd"),
        "broker_acl_file": str(tmp_path / "grbfl.acl"),
        "broker_config_file": str(tmp_path / "grbfl.conf"),
        "broker_tls_dir": str(tmp_path / "certs"),
        "broker_tls_ca_src": str(tls["ca"]),
        "broker_tls_cert_src": str(tls["cert"]),
        "broker_tls_key_src": str(tls["key"]),
        "broker_persistence": False,
    }
    variables = {
        "grbfl_federation": FED,
        "grbfl_broker_passwords": PASSWORDS,
        **files,
    }
    playbook = tmp_path / "broker.yml"
    playbook.write_text(
        "- name: Configure the broker's files\n"
        "  hosts: broker\n"
        "  roles:\n"
        "    - role: broker\n"
    )
    inventory = local_inventory(tmp_path, sys.executable)
    # Past the package installation: apt is not the role's to test here.
    start = ("--start-at-task", "Create the TLS directory")

    first = run_playbook(tmp_path, inventory, playbook, variables, *start)
    second = run_playbook(tmp_path, inventory, playbook, variables, *start)

    assert first.returncode == 0, first.stdout[-5000:] + first.stderr
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr
    assert recap(first.stdout)["server"]["changed"] >= 5
    assert recap(second.stdout)["server"]["changed"] == 0, second.stdout
    rendered = {"ansible_managed": "Ansible managed", **files}
    for template, written in (
        ("grbfl.acl.j2", "grbfl.acl"),
        ("grbfl.conf.j2", "grbfl.conf"),
    ):
        assert (tmp_path / written).read_text() == render(
            "broker", template, **rendered
        )
    assert {p.name for p in (tmp_path / "certs").iterdir()} == {
        "grbfl-ca.crt",
        "grbfl-server.crt",
        "grbfl-server.key",
    }
    users = {
        line.split(":")[0] for line in (tmp_path / "grbfl.passwd").read_text().split()
    }
    assert users == set(PASSWORDS)


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


# Daemon settings the role leaves at the daemon's default, and why.
NOT_IN_TEMPLATE = {
    "data.files_list": "the simulator's partitions",
    "data.limit": "a development aid",
    "broker.max_payload_bytes": "the default fits a ResNet-18",
    "broker.tls_ca": "written only when TLS files are given",
    "broker.tls_cert": "written only when TLS files are given",
    "broker.tls_key": "written only when TLS files are given",
    "health.temperature_file": "written only when set",
}
# Settings the role sets on purpose to something else than the daemon's default.
ROLE_CHOICES = {
    "node.role": "participant",
    "node.id": "pi1",
    "broker.username": "pi1",
    "broker.password": PASSWORDS["pi1"],
    "rounds.min_participants": 2,  # a lab has several Pis
}


def test_daemon_config_template_writes_every_setting_with_the_daemons_default():
    """Each key the daemon reads is a role variable defaulting to the daemon's own
    default, so a new daemon setting cannot silently miss the deployment."""
    text = render("daemon", "grbfl.toml.j2", daemon_role="participant")
    written = tomllib.loads(text)
    defaults = config_from_dict(
        {
            "node": {"role": "participant", "id": "pi1"},
            "data": {"dir": "/x", "classes": ["a"]},
        }
    )
    config = config_from_dict(written, source="grbfl.toml.j2")

    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        for field in dataclasses.fields(getattr(config, section.name)):
            key = f"{section.name}.{field.name}"
            present = field.name in written.get(section.name, {})
            value = getattr(getattr(config, section.name), field.name)
            if key in NOT_IN_TEMPLATE:
                assert not present, key
            elif key in ROLE_CHOICES:
                assert value == ROLE_CHOICES[key], key
            elif section.name != "data":
                assert present, f"{key} is missing from grbfl.toml.j2"
                default = getattr(getattr(defaults, section.name), field.name)
                assert value == default, f"{key}: role {value!r}, daemon {default!r}"


def test_shipped_examples_name_the_tls_files_where_the_role_puts_them():
    """examples/*.toml point at the CA file the daemon role installs, so a config
    copied from them works on a host set up by Ansible."""
    text = render("daemon", "grbfl.toml.j2", daemon_broker_tls_ca_src="ca.crt")
    role_ca = tomllib.loads(text)["broker"]["tls_ca"]

    for example in sorted((REPO / "examples").glob("*.toml")):
        broker = tomllib.loads(example.read_text())["broker"]
        assert broker["tls_ca"] == role_ca, example.name


def test_daemon_config_template_writes_the_thermal_file_when_set():
    """daemon_health_temperature_file becomes health.temperature_file."""
    text = render(
        "daemon",
        "grbfl.toml.j2",
        daemon_health_temperature_file="/sys/class/thermal/thermal_zone2/temp",
    )

    health = tomllib.loads(text)["health"]
    assert health["temperature_file"] == "/sys/class/thermal/thermal_zone2/temp"


# --- a real Mosquitto with the rendered files -----------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A fresh CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography (ansible)")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(**allowed: bool) -> Any:
        every = ("digital_signature", "content_commitment", "key_encipherment")
        every += ("data_encipherment", "key_agreement", "key_cert_sign")
        every += ("crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{**dict.fromkeys(every, False), **allowed})

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("grbfl test CA"))
        .issuer_name(name("grbfl test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.crt", "cert": folder / "server.crt"}
    files["key"] = folder / "server.key"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files["key"].chmod(0o600)
    return files


@dataclass(frozen=True)
class RoleBroker:
    """A running Mosquitto configured by the broker role's templates."""

    port: int
    ca: Path


@pytest.fixture
def acl_broker(tmp_path) -> Iterator[RoleBroker]:
    """Mosquitto on loopback with the role's conf, ACL and hashed passwords, and
    its TLS listener serving a certificate from a CA made for this test."""
    for binary in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            pytest.skip(f"{binary} is not installed (apt install mosquitto)")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    passwd = tmp_path / "passwd"
    acl_file = tmp_path / "acl"
    conf = tmp_path / "mosquitto.conf"
    certs = tmp_path / "certs"

    # The files the role would install: passwords hashed the way it hashes them,
    # the TLS files under the names its copy task gives them, ACL and conf.
    for user, password in PASSWORDS.items():
        create = ["-c"] if not passwd.exists() else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    tls = make_tls_files(tmp_path / "controller")
    certs.mkdir()
    for src, dest in (("ca", "grbfl-ca.crt"), ("cert", "grbfl-server.crt")):
        shutil.copy(tls[src], certs / dest)
    shutil.copy(tls["key"], certs / "grbfl-server.key")
    acl_file.write_text(render("broker", "grbfl.acl.j2"))
    conf_text = render(
        "broker",
        "grbfl.conf.j2",
        broker_port=port,
        broker_listen_address="127.0.0.1",
        broker_password_file=str(passwd),
        broker_acl_file=str(acl_file),
        broker_persistence=False,
        broker_tls_dir=str(certs),
        broker_tls_ca_src=str(tls["ca"]),
        broker_tls_cert_src=str(tls["cert"]),
        broker_tls_key_src=str(tls["key"]),
    )
    assert f"certfile {certs}/grbfl-server.crt" in conf_text
    # Started as root, Mosquitto would switch to its own user, which cannot read
    # pytest's private tmp_path; stay the user running the tests.
    me = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(conf_text + f"user {me}\n")

    # Start it and wait until it accepts connections.
    log_path = tmp_path / "mosquitto.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [mosquitto, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"mosquitto did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
    yield RoleBroker(port, tls["ca"])
    proc.terminate()
    proc.wait(timeout=5)


def tls_client(broker: RoleBroker, client_id: str, user: str | None = None):
    """A paho client that trusts the test CA, with user's credentials if given."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set(ca_certs=str(broker.ca))
    if user is not None:
        client.username_pw_set(user, PASSWORDS[user])
    return client


class Recorder:
    """A paho client that records every message it receives."""

    def __init__(self, broker: RoleBroker, user: str, topics: Iterable[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.client = tls_client(broker, f"test-{user}-rec", user)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
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


def publisher(broker: RoleBroker, user: str):
    """A client connected over TLS as user."""
    client = tls_client(broker, f"test-{user}", user)
    client.connect("127.0.0.1", broker.port)
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


def connack(broker: RoleBroker, client) -> Any:
    """Connect over TLS and return the broker's CONNACK reason code."""
    answers: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, userdata, flags, reason, props: answers.put(reason)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        return answers.get(timeout=MESSAGE_TIMEOUT_S)
    finally:
        client.loop_stop()
        client.disconnect()


def mosquitto_client(
    name: str, broker: RoleBroker, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """mosquitto_sub or mosquitto_pub against the broker, as an operator runs it."""
    binary = shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is not installed (apt install mosquitto-clients)")
    return subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(broker.port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def operator_args(broker: RoleBroker) -> list[str]:
    return ["--cafile", str(broker.ca), "-u", "operator", "-P", PASSWORDS["operator"]]


@pytest.mark.broker
def test_broker_drops_participant_writes_to_aggregator_and_peer_topics(acl_broker):
    """Over TLS, Mosquitto delivers a participant's own messages but none of its
    writes to run, model, metrics or another node's topics."""
    pytest.importorskip("paho.mqtt.client")
    watcher = Recorder(acl_broker, "operator", [t("#")])
    forger = publisher(acl_broker, "pi1")
    aggregator = publisher(acl_broker, "server")
    try:
        # Forged writes first; QoS 1 from one client arrives in order, so once the
        # last allowed message is seen, any forged one would have been seen before.
        forged = [t(s) for s in AGGREGATOR_ONLY] + [
            t(s)
            for s in (
                "updates/pi2",
                "updates/pi2/0",
                "nodes/pi2/status",
                "nodes/pi2/health",
                "nodes/server/status",
            )
        ]
        own = [
            t("updates/pi1"),
            t("updates/pi1/0"),
            t("nodes/pi1/health"),
            t("nodes/pi1/status"),
        ]
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


@pytest.mark.broker
def test_broker_refuses_clients_without_valid_credentials(acl_broker):
    """No username, an unknown user or a wrong password: CONNACK says not
    authorised, and nothing such a client sends reaches anyone."""
    pytest.importorskip("paho.mqtt.client")
    anonymous = tls_client(acl_broker, "test-anonymous")
    stranger = tls_client(acl_broker, "test-stranger")
    stranger.username_pw_set("mallory", "guess")
    wrong = tls_client(acl_broker, "test-wrong-password")
    wrong.username_pw_set("pi1", "not-" + PASSWORDS["pi1"])

    codes = [connack(acl_broker, c) for c in (anonymous, stranger, wrong)]
    forged = mosquitto_client(
        "mosquitto_pub",
        acl_broker,
        *("--cafile", str(acl_broker.ca), "-t", t("run"), "-m", "forged"),
    )

    assert all(code.is_failure for code in codes), codes
    assert {code.value for code in codes} <= {134, 135}  # bad password, not authorised
    assert forged.returncode != 0
    assert "not authorised" in forged.stderr.lower()
    retained = mosquitto_client(
        "mosquitto_sub",
        acl_broker,
        *operator_args(acl_broker),
        *("-t", t("run"), "-C", "1", "-W", "2"),
    )
    assert "forged" not in retained.stdout


@pytest.mark.broker
def test_broker_listener_speaks_only_tls_with_its_ca(acl_broker, tmp_path):
    """Valid credentials still cannot talk plain MQTT to the listener, nor TLS to
    a client that does not trust the deployment's CA."""
    plain = mosquitto_client(
        "mosquitto_pub",
        acl_broker,
        *("-u", "server", "-P", PASSWORDS["server"], "-t", t("run"), "-m", "x"),
    )
    other_ca = make_tls_files(tmp_path / "other")["ca"]
    untrusted = mosquitto_client(
        "mosquitto_pub",
        acl_broker,
        *("--cafile", str(other_ca), "-u", "server", "-P", PASSWORDS["server"]),
        *("-t", t("run"), "-m", "x"),
    )
    trusted = mosquitto_client(
        "mosquitto_pub",
        acl_broker,
        *("--cafile", str(acl_broker.ca), "-u", "server", "-P", PASSWORDS["server"]),
        *("-t", t("run"), "-m", "x"),
    )

    assert plain.returncode != 0
    assert untrusted.returncode != 0
    assert trusted.returncode == 0, trusted.stderr


@pytest.mark.broker
@pytest.mark.slow
def test_deployed_participant_health_shows_in_mosquitto_sub(
    acl_broker, tmp_path, digits_dirs
):
    """A participant run with the daemon role's config, against the broker role's
    TLS listener and ACL: the operator's mosquitto_sub shows its health and status,
    and its last word on a clean stop is offline."""
    train_dir, _ = digits_dirs
    config_dir = tmp_path / "etc"
    (config_dir / "tls").mkdir(parents=True)
    shutil.copy(acl_broker.ca, config_dir / "tls" / "ca.crt")
    config = config_dir / "grbfl.toml"
    config.write_text(
        render(
            "daemon",
            "grbfl.toml.j2",
            daemon_role="participant",
            inventory_hostname="pi1",
            daemon_broker_host="127.0.0.1",
            daemon_broker_port=acl_broker.port,
            daemon_broker_tls_ca_src="ca.crt on the controller",
            daemon_config_dir=str(config_dir),
            daemon_data_dir=str(train_dir),
            daemon_classes=sorted(p.name for p in train_dir.iterdir()),
            daemon_state_dir=str(tmp_path / "state"),
            daemon_health_interval_s=0.5,
        )
    )
    log_path = tmp_path / "pi1.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "grbfl", "run", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        health = mosquitto_client(
            "mosquitto_sub",
            acl_broker,
            *operator_args(acl_broker),
            *("-t", t("nodes/pi1/health"), "-C", "1", "-W", "120"),
            timeout=130,
        )
        status = mosquitto_client(
            "mosquitto_sub",
            acl_broker,
            *operator_args(acl_broker),
            *("-t", t("nodes/pi1/status"), "-C", "1", "-W", "10"),
        )
    finally:
        daemon.terminate()
        code = daemon.wait(60)
    goodbye = mosquitto_client(
        "mosquitto_sub",
        acl_broker,
        *operator_args(acl_broker),
        *("-t", t("nodes/pi1/status"), "-C", "1", "-W", "10"),
    )

    log = log_path.read_text(errors="replace")
    assert health.returncode == 0, health.stderr + log[-3000:]
    body = json.loads(health.stdout)
    assert body["node"] == "pi1"
    assert {"temperature_c", "throttle", "cpu_freq_mhz", "load_avg", "memory"} <= set(
        body
    )
    assert body["memory"]["available_bytes"] > 0
    assert json.loads(status.stdout)["role"] == "participant"
    assert json.loads(goodbye.stdout)["state"] == "offline"
    assert code == 0, log[-3000:]
    assert "unreachable" not in log and "not authorised" not in log.lower()
