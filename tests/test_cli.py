"""The `bsscihub` command, run as a real subprocess: init, certificates, users, errors, --help.
Commands that start no reactor and open no store (--help, --version, config, usage errors) call its
main() in-process."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509

from tests.helpers import CONFIG, REPO, clean_env, until


def bsscihub(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bsscihub.cli", *args],
        cwd=cwd,
        env=clean_env(**(env or {})),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bsscihub_in_process(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """As `bsscihub` above, through `main()` in this process: the same arguments, environment,
    working directory, exit status and output, without starting an interpreter each time."""
    from bsscihub.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        for key in [k for k in os.environ if k.startswith("BSSCIHUB_")]:
            del os.environ[key]
        os.environ.update(env or {})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, --version, usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["bsscihub", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    home = tmp_path_factory.mktemp("hub")
    return home, bsscihub(home, "init", "--config", CONFIG)


def test_init_creates_pki_database_and_admin(initialised: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, result = initialised
    assert result.returncode == 0, result.stderr
    for name in ("ca.pem", "ca.key", "hub.pem", "hub.key"):
        assert (home / "certs" / name).exists(), name
    for key in ("ca.key", "hub.key"):
        assert stat.S_IMODE((home / "certs" / key).stat().st_mode) == 0o600
    assert (home / "var" / "hub.sqlite").exists()
    assert "user admin created; its password (shown only now): " in result.stdout
    password = result.stdout.rsplit(": ", 1)[1].strip()
    assert len(password) >= 16 and password not in result.stderr


def test_init_is_idempotent(initialised: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, _ = initialised
    before = {p.name: p.read_bytes() for p in (home / "certs").iterdir()}
    again = bsscihub(home, "init", "--config", CONFIG)
    assert again.returncode == 0, again.stderr
    assert "exists, kept" in again.stdout
    assert "password" not in again.stdout
    assert {p.name: p.read_bytes() for p in (home / "certs").iterdir()} == before


def test_issue_base_station_certificate(initialised: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, _ = initialised
    result = bsscihub(home, "certs", "issue-bs", "bs-001", "--out", "out", "--config", CONFIG)
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((home / "out" / "bs-001.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((home / "certs" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (home / "out" / "ca.pem").read_bytes() == (home / "certs" / "ca.pem").read_bytes()
    assert stat.S_IMODE((home / "out" / "bs-001.key").stat().st_mode) == 0o600
    again = bsscihub(home, "certs", "issue-bs", "bs-001", "--out", "out", "--config", CONFIG)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("bsscihub: ")


def test_issued_certificate_is_bound_to_its_eui_listed_and_audited(
    initialised: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    import sqlite3

    from bsscihub.protocols.bssci.identity import cert_station

    home, _ = initialised
    result = bsscihub(home, "certs", "issue-bs", "bs-roof", "--eui", "70B3-D59C-D000-0001", "--out", "bound",
                      "--config", CONFIG)
    assert result.returncode == 0, result.stderr
    assert "bound to base station 70b3d59cd0000001" in result.stdout and result.stderr == ""
    cert = x509.load_pem_x509_certificate((home / "bound" / "bs-roof.pem").read_bytes())
    assert cert_station(cert) == "70b3d59cd0000001"
    with sqlite3.connect(home / "var" / "hub.sqlite") as db:
        issued = db.execute("SELECT name, binding_kind, binding_subject, actor FROM issued_certs WHERE serial = ?",
                            (format(cert.serial_number, "x"),)).fetchall()
        audited = db.execute("SELECT actor, target FROM audit_log WHERE action = 'cert.issue'").fetchall()
    assert issued == [("bs-roof", "bssci.station", "70b3d59cd0000001", "cli")]
    assert ("cli", format(cert.serial_number, "x")) in audited
    unbound = bsscihub(home, "certs", "issue-bs", "bs-loose", "--out", "bound", "--config", CONFIG)
    assert unbound.returncode == 0 and "bound to no EUI" in unbound.stdout and "--eui" in unbound.stderr
    bad = bsscihub(home, "certs", "issue-bs", "bs-bad", "--eui", "12345", "--out", "bound", "--config", CONFIG)
    assert bad.returncode == 1 and bad.stderr == "bsscihub: bad base-station EUI '12345': expected 16 hex digits\n"


def test_application_center_certificate_is_marked_listed_and_audited(
    initialised: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    import sqlite3

    from bsscihub.protocols.bssci.identity import cert_station, is_application_center

    home, _ = initialised
    result = bsscihub(home, "certs", "issue-ac", "ac-main", "--out", "ac", "--config", CONFIG)
    assert result.returncode == 0, result.stderr
    assert "for a mioty application center (SCACI)" in result.stdout
    cert = x509.load_pem_x509_certificate((home / "ac" / "ac-main.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((home / "certs" / "ca.pem").read_bytes()))
    assert is_application_center(cert) and cert_station(cert) is None
    with sqlite3.connect(home / "var" / "hub.sqlite") as db:
        issued = db.execute("SELECT name, binding_kind, binding_subject, actor FROM issued_certs WHERE serial = ?",
                            (format(cert.serial_number, "x"),)).fetchall()
        audited = db.execute("SELECT actor, target FROM audit_log WHERE action = 'cert.issue'").fetchall()
    assert issued == [("ac-main", "scaci.ac", "", "cli")] and ("cli", format(cert.serial_number, "x")) in audited


def test_sensors_import_and_export_as_csv(initialised: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, _ = initialised
    key = "000102030405060708090A0B0C0D0E0F"
    (home / "sensors.csv").write_text(f"eui;nwKey;shortAddr;bidi\nFCA84A0300001234;{key};1234;true\n")
    imported = bsscihub(home, "sensors", "import", "sensors.csv", "--config", CONFIG)
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 end points from sensors.csv: 1 new" in imported.stdout
    exported = bsscihub(home, "sensors", "export", "--format", "csv", "--config", CONFIG)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines() == ["eui,nwKey,shortAddr,bidi", f"FCA84A0300001234,{key},1234,true"]
    as_json = bsscihub(home, "sensors", "export", "--config", CONFIG)
    assert '"eui": "fca84a0300001234"' in as_json.stdout


def test_issue_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    result = bsscihub(tmp_path, "certs", "issue-bs", "bs-1", "--out", "o", "--config", CONFIG)
    assert result.returncode == 1
    assert "run `bsscihub init` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_user_add_and_duplicate(initialised: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, _ = initialised
    added = bsscihub(home, "user", "add", "olga", "--role", "operator", "--config", CONFIG)
    assert added.returncode == 0, added.stderr
    assert "user olga (operator) created" in added.stdout
    duplicate = bsscihub(home, "user", "add", "olga", "--role", "viewer", "--config", CONFIG)
    assert duplicate.returncode == 1
    assert duplicate.stderr == "bsscihub: user 'olga' exists already\n"
    bad_role = bsscihub_in_process(home, "user", "add", "x", "--role", "root", "--config", CONFIG)
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr


def test_environment_overrides_apply_to_subcommands(tmp_path: Path) -> None:
    result = bsscihub(tmp_path, "init", "--config", CONFIG, env={"BSSCIHUB_DATA_DIR": str(tmp_path / "elsewhere")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "hub.sqlite").exists()
    bad = bsscihub(tmp_path, "user", "add", "x", "--role", "viewer", env={"BSSCIHUB_LOG_LEVEL": "loud"})
    assert bad.returncode == 2
    assert bad.stderr == "config error: log.level = 'loud': expected one of debug, info, warn, error\n"


SUBCOMMANDS = [
    [], ["init"], ["certs", "issue-bs"], ["user", "add"], ["user", "list"], ["user", "passwd"], ["user", "disable"],
    ["user", "enable"], ["user", "role"], ["config", "check"], ["config", "sample"],
    ["sensors", "import"], ["sensors", "export"], ["sim"],
]


@pytest.mark.parametrize("args", SUBCOMMANDS)
def test_help_everywhere(tmp_path: Path, args: list[str]) -> None:
    result = bsscihub_in_process(tmp_path, *args, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_version(tmp_path: Path) -> None:
    from bsscihub import __version__

    result = bsscihub_in_process(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout == f"bsscihub {__version__}\n"


def test_init_writes_the_sample_configuration_when_there_is_none(tmp_path: Path) -> None:
    sample = (REPO / "etc" / "hub.yaml").read_text()
    result = bsscihub(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    assert "configuration etc/hub.yaml: created from the documented sample" in result.stdout
    assert (tmp_path / "etc" / "hub.yaml").read_text() == sample
    assert (tmp_path / "var" / "hub.sqlite").exists()  # and init went on with it

    # One the operator edited is never replaced.
    edited = sample.replace("level: info", "level: debug")
    (tmp_path / "etc" / "hub.yaml").write_text(edited)
    again = bsscihub(tmp_path, "init")
    assert again.returncode == 0, again.stderr
    assert "created from the documented sample" not in again.stdout
    assert (tmp_path / "etc" / "hub.yaml").read_text() == edited

    elsewhere = bsscihub(tmp_path, "init", "--config", "conf/site.yaml")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (tmp_path / "conf" / "site.yaml").read_text() == sample
    assert bsscihub_in_process(tmp_path, "config", "sample").stdout == sample


def test_config_check_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    import yaml

    env = {
        "BSSCIHUB_MQTT_PASSWORD": "0123",
        "BSSCIHUB_MQTT_URL": "mqtt://hub:urlsecret@broker:1883",
        "BSSCIHUB_GATE_SECRET": "gatesecret",
        "BSSCIHUB_MQTT_KEEPALIVE": "045",
        "BSSCIHUB_WEB_LISTEN": "tcp:18080",
    }
    result = bsscihub_in_process(tmp_path, "config", "check", CONFIG, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {CONFIG}: valid.")
    effective = yaml.safe_load(result.stdout)
    assert effective["mqtt"]["password"] == "***"
    assert effective["mqtt"]["url"] == "mqtt://hub:***@broker:1883"
    assert effective["gate"]["secret"] == "***"
    assert effective["mqtt"]["keepalive"] == 45
    assert effective["web"]["listen"] == "tcp:18080"
    assert effective["mioty"]["dedup_window"] == 0.5
    assert set(effective["families"]) >= {"mioty", "ble", "gate", "devices"}  # the enabled ones, not "unset"
    for secret in ("0123", "urlsecret", "gatesecret"):
        assert secret not in result.stdout


def test_config_check_of_a_bad_file_names_the_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  keepalive: often\n")
    result = bsscihub_in_process(tmp_path, "config", "check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "config error: mqtt.keepalive = 'often': expected a positive whole number\n"
    missing = bsscihub_in_process(tmp_path, "config", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read the file" in missing.stderr
    env_bad = bsscihub_in_process(tmp_path, "config", "check", CONFIG, env={"BSSCIHUB_TLS_LENIENT": "perhaps"})
    assert env_bad.returncode == 2
    assert env_bad.stderr == "config error: tls.lenient = 'perhaps': expected true or false\n"


def _users(home: Path) -> dict[str, tuple[str, str]]:
    listed = bsscihub(home, "user", "list", "--config", CONFIG)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "ROLE", "STATE", "CREATED"]
    return {r.split()[0]: (r.split()[1], r.split()[2]) for r in rows}


def test_user_list_role_disable_enable_and_passwd(tmp_path: Path) -> None:
    assert bsscihub(tmp_path, "init", "--config", CONFIG).returncode == 0
    assert bsscihub(tmp_path, "user", "add", "vera", "--role", "viewer", "--config", CONFIG).returncode == 0
    assert _users(tmp_path) == {"admin": ("admin", "enabled"), "vera": ("viewer", "enabled")}

    promoted = bsscihub(tmp_path, "user", "role", "vera", "admin", "--config", CONFIG)
    assert (promoted.returncode, promoted.stdout) == (0, "user vera is now admin\n")
    disabled = bsscihub(tmp_path, "user", "disable", "admin", "--config", CONFIG)
    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout.startswith("user admin disabled")
    assert _users(tmp_path) == {"admin": ("admin", "disabled"), "vera": ("admin", "enabled")}

    # vera is now the last enabled admin: neither demoting nor disabling her is allowed.
    for args in (["role", "vera", "operator"], ["disable", "vera"]):
        refused = bsscihub(tmp_path, "user", *args, "--config", CONFIG)
        assert refused.returncode == 1
        assert refused.stderr == "bsscihub: 'vera' is the last enabled admin\n"
    assert _users(tmp_path)["vera"] == ("admin", "enabled")

    assert bsscihub(tmp_path, "user", "enable", "admin", "--config", CONFIG).stdout == "user admin enabled\n"
    missing = bsscihub(tmp_path, "user", "disable", "nobody", "--config", CONFIG)
    assert (missing.returncode, missing.stderr) == (1, "bsscihub: no user 'nobody'\n")
    bad_role = bsscihub_in_process(tmp_path, "user", "role", "vera", "root", "--config", CONFIG)
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr

    # passwd: from standard input (scripts), or generated and shown once.
    changed = bsscihub(tmp_path, "user", "passwd", "vera", "--config", CONFIG, stdin="correct horse 0123\n")
    assert changed.returncode == 0, changed.stderr
    assert "correct horse" not in changed.stdout + changed.stderr
    short = bsscihub(tmp_path, "user", "passwd", "vera", "--config", CONFIG, stdin="short\n")
    assert (short.returncode, short.stderr) == (1, "bsscihub: password too short: at least 8 characters\n")
    empty = bsscihub(tmp_path, "user", "passwd", "vera", "--config", CONFIG, stdin="")
    assert empty.returncode == 1 and "no password on standard input" in empty.stderr
    generated = bsscihub(tmp_path, "user", "passwd", "vera", "--generate", "--config", CONFIG)
    assert generated.returncode == 0, generated.stderr
    assert "its password (shown only now): " in generated.stdout
    assert _check_password(tmp_path, "vera", generated.stdout.rsplit(": ", 1)[1].strip())
    assert not _check_password(tmp_path, "vera", "correct horse 0123")


def _check_password(home: Path, name: str, password: str) -> bool:
    import sqlite3

    from bsscihub.users import verify_password

    with sqlite3.connect(home / "var" / "hub.sqlite") as db:
        (stored,) = db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
    return verify_password(stored, password)


@pytest_twisted.ensureDeferred
async def test_user_disabled_from_the_cli_is_refused_by_the_running_web_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI works on the database the hub uses: a log-in, a bearer token, an API key and an open session
    all stop working (the session at the hub's next housekeeping round), and a role change reaches sessions."""
    from twisted.internet import threads

    from bsscihub.web.auth import KEY_CACHE_TTL
    from tests.test_web_support import PASSWORD, build_harness, fast_hashing

    fast_hashing(monkeypatch)
    h = await build_harness(tmp_path)
    try:
        issued = await h.request("POST", "/api/v1/auth/token", json_body={"username": "operator", "password": PASSWORD})
        assert issued.code == 201, issued.body
        token = issued.json()["token"]
        assert (await h.request("GET", "/api/v1/dashboard", token=token)).code == 200
        assert (await h.request("GET", "/api/v1/dashboard", role="operator")).code == 200
        cookies, _ = await h.login("operator")
        admin_cookies, _ = await h.login("admin")
        assert (await h.request("GET", "/api/v1/dashboard", cookies=cookies)).code == 200

        run = await threads.deferToThread(
            bsscihub, tmp_path, "user", "disable", "operator", "--config", str(tmp_path / "hub.yaml")
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout == "user operator disabled, 1 bearer token(s) revoked\n"
        h.clock.advance(KEY_CACHE_TTL)  # what the hub remembered about keys is stale now

        assert (await h.request("GET", "/api/v1/dashboard", token=token)).code == 401
        assert (await h.request("GET", "/api/v1/dashboard", role="operator")).code == 401  # its API key
        login = await h.request("POST", "/api/v1/auth/login", json_body={"username": "operator", "password": PASSWORD})
        assert login.code == 401
        assert (await h.request("GET", "/api/v1/dashboard", role="viewer")).code == 200  # others unaffected

        # The open session ends at the hub's next housekeeping round; another user's stays.
        h.web.start()
        h.clock.advance(h.web.refusals.interval)

        async def answers(path: str, jar: Any, code: int) -> bool:
            return bool((await h.request("GET", path, cookies=jar)).code == code)

        await until(lambda: answers("/api/v1/dashboard", cookies, 401), "the disabled user's session ended")
        assert (await h.request("GET", "/api/v1/dashboard", cookies=cookies)).code == 401
        assert (await h.request("GET", "/api/v1/dashboard", cookies=admin_cookies)).code == 200

        # A role changed from the CLI reaches the open sessions of that user the same way.
        run = await threads.deferToThread(
            bsscihub, tmp_path, "user", "role", "admin", "viewer", "--config", str(tmp_path / "hub.yaml")
        )
        assert run.returncode == 1 and "last enabled admin" in run.stderr  # the harness has one admin only
        run = await threads.deferToThread(
            bsscihub, tmp_path, "user", "add", "ada", "--role", "admin", "--config", str(tmp_path / "hub.yaml")
        )
        assert run.returncode == 0, run.stderr
        run = await threads.deferToThread(
            bsscihub, tmp_path, "user", "role", "admin", "viewer", "--config", str(tmp_path / "hub.yaml")
        )
        assert run.returncode == 0, run.stderr
        h.clock.advance(h.web.refusals.interval)
        await until(lambda: answers("/api/v1/users", admin_cookies, 403), "the session has the viewer role")
        assert (await h.request("GET", "/api/v1/users", cookies=admin_cookies)).code == 403
        assert (await h.request("GET", "/api/v1/dashboard", cookies=admin_cookies)).code == 200

        run = await threads.deferToThread(
            bsscihub, tmp_path, "user", "enable", "operator", "--config", str(tmp_path / "hub.yaml")
        )
        assert run.returncode == 0, run.stderr
        h.clock.advance(KEY_CACHE_TTL)
        login = await h.request("POST", "/api/v1/auth/login", json_body={"username": "operator", "password": PASSWORD})
        assert login.code == 200
        assert (await h.request("GET", "/api/v1/dashboard", token=token)).code == 401  # revoked stays revoked
    finally:
        h.web.stop()
        await h.hub.store.stop()


def test_init_password_file_and_hostnames(tmp_path: Path) -> None:
    """The container's first start: the admin password goes to a 0600 file, not to standard output."""
    result = bsscihub(
        tmp_path, "init", "--config", CONFIG, "--password-file", "secret/admin-password",
        "--hostname", "hub.example.net", "--hostname", "192.0.2.7",
    )
    assert result.returncode == 0, result.stderr
    password_file = tmp_path / "secret" / "admin-password"
    password = password_file.read_text().strip()
    assert len(password) >= 16
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password not in result.stdout + result.stderr
    assert "its password is in secret/admin-password" in result.stdout
    assert _check_password(tmp_path, "admin", password)

    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "hub.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]


def test_init_names_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    import socket
    import uuid
    from urllib.parse import urlsplit

    from tests.conftest import PG_ADMIN_URL

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin = urlsplit(PG_ADMIN_URL)  # trust auth: the password is not checked, only kept out of the output
    missing = f"{admin.username}:sekret@{admin.hostname}:{admin.port or 5432}/bsscihub_missing_{uuid.uuid4().hex[:8]}"
    cases = {
        f"postgresql://hub:sekret@127.0.0.1:{port}/hub": "Connection refused",
        f"postgresql://{missing}": "does not exist",
    }
    for url, reason in cases.items():
        result = bsscihub(tmp_path, "init", env={"BSSCIHUB_DATABASE": url})
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr  # no traceback
        assert lines[0].startswith("bsscihub: database = '") and reason in lines[0], lines[0]
        assert "sekret" not in result.stderr + result.stdout
