"""Deployment files: the container entry point run for real, the image's and compose file's settings, the unit.

What needs a container engine (building and running the image) is not run here; this checks what can be.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from bsscihub.tap import load_hub_config
from tests.broker import free_port
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage, as the container sees it."""
    text = (REPO / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", final.replace("\\\n", "\\ "), flags=re.M | re.S):
        for name, value in re.findall(r"(\w+)=(\S+)", block):
            env[name] = value
    return env


def test_the_images_overrides_are_valid_configuration() -> None:
    env = dockerfile_env()
    assert env["BSSCIHUB_DATA_DIR"] == "/data" and env["HUB_CONFIG"] == "/config/hub.yaml"
    config, families = load_hub_config(str(REPO / "etc" / "hub.yaml"), env)
    assert str(config.data_dir) == "/data"
    assert config.tls.key == "/certs/hub.key" and config.tls.ca_key == "/certs/ca.key"
    assert config.web.listen == "tcp:8080"  # every interface of the container
    assert config.log.format == "json"
    text = (REPO / "Dockerfile").read_text()
    assert 'VOLUME ["/config", "/data", "/certs"]' in text
    assert "USER bsscihub:bsscihub" in text
    assert '"/usr/local/lib/bsscihub-healthcheck.py"' in text.split("HEALTHCHECK", 1)[1]
    assert "COPY deploy/healthcheck.py /usr/local/lib/bsscihub-healthcheck.py" in text


def test_compose_file_starts_the_hub_with_mosquitto_and_postgresql() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"hub", "postgres", "mosquitto"}
    hub = services["hub"]
    assert hub["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {v.split(":")[1] for v in hub["volumes"]} == {"/config", "/data", "/certs"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
            else:
                assert source in compose["volumes"], source
    # The hub's settings in compose are valid keys with the defaults the file gives them.
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in hub["environment"].items()}
    config, _ = load_hub_config(str(REPO / "etc" / "hub.yaml"), {**dockerfile_env(), **env})
    assert config.database == "postgresql://bsscihub:bsscihub@postgres:5432/bsscihub"
    assert config.mqtt.url == "mqtt://mosquitto:1883"
    # The first start's message names this service through the entry point's default.
    assert "HUB_EXEC" not in env and "${HUB_EXEC:-docker compose exec hub}" in ENTRYPOINT.read_text()
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "bsscihub"
    assert (REPO / "deploy" / "mosquitto.conf").read_text().count("listener 1883") == 1


def run_entrypoint(home: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sh", str(ENTRYPOINT), *args], env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def container_env(home: Path, web: int) -> dict[str, str]:
    """The Dockerfile's environment with the container's paths moved under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BSSCIHUB_", "HUB_"))}
    for name, value in dockerfile_env().items():
        if name == "PATH":
            continue
        for root in ("/config", "/data", "/certs"):
            if value.startswith(root):
                value = str(home) + value
        env[name] = value
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's bsscihub and twistd
        BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1",
        BSSCIHUB_BSSCI_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
        BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",  # no broker: the hub must start anyway
        HUB_HOSTNAMES="hub.example.net 192.0.2.7",
    )
    return env


def wait_serving(process: subprocess.Popen[str], port: int) -> None:
    def serving() -> bool:
        assert process.poll() is None, process.communicate()[0]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answers: it serves
        except OSError:
            return False

    try:
        wait_until(serving, "the hub serving HTTP", timeout=45, interval=0.1)
    except TimeoutError:
        process.kill()
        raise AssertionError(f"the hub did not serve HTTP within 45 s: {process.communicate()[0]}") from None


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)  # reaches twistd itself: the script exec'd it
    output, _ = process.communicate(timeout=20)
    return process.returncode, output


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_initialises_on_first_start_then_runs_the_hub(tmp_path: Path) -> None:
    for d in ("config", "data", "certs"):
        (tmp_path / d).mkdir()
    web = free_port()
    env = container_env(tmp_path, web)

    # As the cluster's compose file sets it (the single hub's is the entry point's default).
    first = run_entrypoint(tmp_path, env={**env, "HUB_EXEC": "docker compose -f c.yml exec hub1"})
    wait_serving(first, web)
    probe = {**env, "HUB_HEALTH_URL": f"http://127.0.0.1:{web}/health/live"}
    healthy = subprocess.run([sys.executable, str(HEALTHCHECK)], env=probe, capture_output=True, text=True)
    assert (healthy.returncode, healthy.stderr) == (0, ""), healthy.stderr  # live, though no broker answers
    status, output = stop(first)
    assert status == 0, output
    password_file = tmp_path / "data" / "initial-admin-password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password not in output  # the log says where it is, never what it is
    assert f"as \"admin\" with the password in {password_file}" in output
    assert f"docker compose -f c.yml exec hub1 cat {password_file}" in output
    assert "exec hub " not in output
    assert (tmp_path / "config" / "hub.yaml").read_text() == (REPO / "etc" / "hub.yaml").read_text()
    for name in ("ca.pem", "ca.key", "hub.pem", "hub.key"):
        assert (tmp_path / "certs" / name).exists(), name
    assert (tmp_path / "data" / "hub.sqlite").exists()
    assert not list(tmp_path.rglob("*.pid")), "no pid file"
    assert '"log_level"' in output or '"level"' in output  # BSSCIHUB_LOG_FORMAT=json from the image

    unhealthy = subprocess.run([sys.executable, str(HEALTHCHECK)], env=probe, capture_output=True, text=True)
    assert unhealthy.returncode == 1
    assert unhealthy.stderr.startswith(f"unhealthy: http://127.0.0.1:{web}/health/live: ")
    assert unhealthy.stderr.count("\n") == 1  # one line, no traceback

    second = run_entrypoint(tmp_path, "hub", env=env)
    wait_serving(second, web)
    status, output = stop(second)
    assert status == 0, output
    assert "first start" not in output and "exists, kept" in output
    assert password_file.read_text().strip() == password

    other = run_entrypoint(tmp_path, "bsscihub", "--version", env=env)
    assert other.communicate(timeout=30)[0].startswith("bsscihub ")
    assert other.returncode == 0


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_stops_with_the_config_error(tmp_path: Path) -> None:
    env = container_env(tmp_path, free_port()) | {"BSSCIHUB_MQTT_KEEPALIVE": "often"}
    process = run_entrypoint(tmp_path, env=env)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    lines = output.splitlines()
    assert "config error: mqtt.keepalive = 'often': expected a positive whole number" in lines
    assert "Traceback" not in output and not any("twistd" in line for line in lines)  # it stopped before the hub


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "bsscihub.service"
    text = (REPO / "deploy" / "bsscihub.service").read_text()
    # Point the unit at this virtualenv, since /opt/bsscihub does not exist here.
    unit.write_text(text.replace("/opt/bsscihub/bin/", f"{Path(sys.executable).parent}/"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=\n", "--pidfile= "):
        assert option in text, option


def haproxy_config(env: dict[str, str]) -> dict[str, list[list[str]]]:
    """deploy/haproxy.cfg as HAProxy reads it with `env`: its presetenv defaults, then ${VAR} expanded;
    the lines of each section ("global", "frontend bssci", ...), split into words."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    values = dict(env)
    for raw in (REPO / "deploy" / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], w).strip('"') for w in line.split()]
        if raw[0].isspace():
            current.append(words)
            if words[0] == "presetenv":
                values.setdefault(words[1], words[2])
        else:
            current = sections.setdefault(" ".join(words), [])
    return sections


def port_of(listen: str) -> int:
    match = re.match(r"tcp:(\d+)", listen)
    assert match is not None, listen
    return int(match.group(1))


def test_cluster_compose_file_runs_two_hubs_behind_haproxy() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.cluster.yml").read_text())
    services = compose["services"]
    assert set(services) == {"hub1", "hub2", "haproxy", "postgres", "redis", "mosquitto"}
    haproxy = haproxy_config({})
    nodes, hubs, keys = set(), {}, {}
    for name in ("hub1", "hub2"):
        hub = services[name]
        # Shared configuration and PKI, a data directory (outbox) of its own.
        assert {v.split(":")[1] for v in hub["volumes"]} == {"/config", "/data", "/certs"}
        assert f"{name}-data:/data" in hub["volumes"]
        for volume in hub["volumes"]:
            assert volume.split(":")[0] in compose["volumes"], volume
        env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in hub["environment"].items()}
        # Every BSSCIHUB_* variable is a real key (an unknown one stops the hub), with the value compose gives.
        config, _ = load_hub_config(str(REPO / "etc" / "hub.yaml"), {**dockerfile_env(), **env})
        effective = config.masked()
        for var, value in env.items():
            if var.startswith("BSSCIHUB_"):
                setting = var.removeprefix("BSSCIHUB_").lower()
                section, _, key = setting.partition("_")
                shown = effective[setting] if setting in effective else effective[section][key]
                masked = re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1***@", value)  # as the effective config shows it
                assert str(shown) in (value, masked, "***"), (var, shown, value)
        assert config.database.startswith("postgresql://") and config.section("cluster").redis == "redis://redis:6379/0"
        nodes.add(config.section("cluster").node)
        # The first start's message tells how to reach this hub's container: its own service, this file.
        assert env["HUB_EXEC"] == f"docker compose -f docker-compose.cluster.yml exec {name}"
        # The key files in a volume both hubs mount (what one seals, the other opens).
        keys[name] = [v.split(":")[0] for v in hub["volumes"] if config.keys_dir.is_relative_to(v.split(":")[1])]
        hubs[name] = (port_of(config.section("bssci").listen), port_of(config.web.listen))
    assert nodes == {"hub1", "hub2"}
    assert keys["hub1"] == keys["hub2"] == ["hub-config"], keys
    # hub2 waits for hub1's health check (the image's HEALTHCHECK), hub1 for PostgreSQL's and Redis's.
    assert services["hub2"]["depends_on"]["hub1"]["condition"] == "service_healthy"
    assert "HEALTHCHECK" in (REPO / "Dockerfile").read_text()
    for dependency in ("postgres", "redis"):
        assert services["hub1"]["depends_on"][dependency]["condition"] == "service_healthy"
        assert services[dependency]["healthcheck"]["test"][0] == "CMD"
    # HAProxy as compose runs it: the file mounted unchanged, its defaults name compose's services and
    # the hubs' real ports; it publishes what its frontends bind; it checks the hubs' readiness.
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    assert "environment" not in services["haproxy"]
    for backend, port in (("hubs_bssci", 0), ("hubs_web", 1)):
        lines = haproxy[f"backend {backend}"]
        assert ["option", "httpchk", "GET", "/health/ready"] in lines
        servers = {words[1]: words[2:] for words in lines if words[0] == "server"}
        assert set(servers) == {"hub1", "hub2"}
        # The hubs' names resolved again while running: a restarted hub container has a new address.
        (default,) = [words for words in lines if words[0] == "default-server"]
        assert default[default.index("resolvers") + 1] == "dns" and "init-addr" in default, default
        for name, words in servers.items():
            assert words[0] == f"{name}:{hubs[name][port]}", words
            if backend == "hubs_bssci":
                assert words[1:] == ["check", "port", str(hubs[name][1])], words
    assert ["parse-resolv-conf"] in haproxy["resolvers dns"]  # the engine's DNS, which knows the services
    published = {entry.rsplit(":", 1)[1] for entry in services["haproxy"]["ports"]}
    binds = {words[1].rsplit(":", 1)[1] for name in ("frontend bssci", "frontend web")
             for words in haproxy[name] if words[0] == "bind"}
    assert binds == published == {"16017", "8080"}
    if shutil.which("haproxy", path="/usr/sbin:/usr/bin"):
        haproxy_bin = shutil.which("haproxy", path="/usr/sbin:/usr/bin")
        assert haproxy_bin is not None
        # The configuration parses (compose's names resolve only there, so not checked here) ...
        checked = subprocess.run([haproxy_bin, "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True,
                                 text=True)
        alerts = [line for line in (checked.stdout + checked.stderr).splitlines() if "[ALERT]" in line]
        assert all("could not resolve address" in a or "Failed to initialize server(s) addr" in a for a in alerts), \
            alerts
        # ... and with the settings of docs/cluster.md's "Without containers" it is valid as it is.
        docs = (REPO / "docs" / "cluster.md").read_text().split("\n## Without containers\n", 1)[1]
        settings = dict(re.findall(r"\b([A-Z][A-Z0-9_]+)=(\S+)", re.findall(r"```sh\n(.*?)```", docs, re.S)[0]))
        local = {k: v for k, v in settings.items() if not k.startswith("BSSCIHUB_")}
        checked = subprocess.run([haproxy_bin, "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True,
                                 text=True, env={**os.environ, **local})
        assert checked.returncode == 0 and "Configuration file is valid" in checked.stdout, checked.stderr
        servers = [words for words in haproxy_config(local)["backend hubs_bssci"] if words[0] == "server"]
        assert [w[2] for w in servers] == [f"127.0.0.1:{local['HUB1_BSSCI']}", f"127.0.0.1:{local['HUB2_BSSCI']}"]
