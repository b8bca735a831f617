"""The `bsscihub` command, run as a real subprocess: init, certificates, users, errors, --help."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "etc" / "hub.yaml")


def bsscihub(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BSSCIHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "bsscihub.cli", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    bad_role = bsscihub(home, "user", "add", "x", "--role", "root", "--config", CONFIG)
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr


def test_environment_overrides_apply_to_subcommands(tmp_path: Path) -> None:
    result = bsscihub(tmp_path, "init", "--config", CONFIG, env={"BSSCIHUB_DATA_DIR": str(tmp_path / "elsewhere")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "hub.sqlite").exists()
    bad = bsscihub(tmp_path, "user", "add", "x", "--role", "viewer", env={"BSSCIHUB_LOG_LEVEL": "loud"})
    assert bad.returncode == 2
    assert bad.stderr == "config error: log.level = 'loud': expected one of debug, info, warn, error\n"


SUBCOMMANDS = [
    [], ["init"], ["certs", "issue-bs"], ["user", "add"], ["sensors", "import"], ["sensors", "export"], ["sim"]
]


@pytest.mark.parametrize("args", SUBCOMMANDS)
def test_help_everywhere(tmp_path: Path, args: list[str]) -> None:
    result = bsscihub(tmp_path, *args, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
