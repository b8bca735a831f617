"""Shared fixtures: stores on both backends (a fresh PostgreSQL database per run), hubs, certificates.

PostgreSQL comes from HUBTEST_PG (default postgresql://postgres@127.0.0.1:5432/test, trust auth).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogEvent

from bsscihub.config import HubConfig, load_config
from bsscihub.family import all_config_sections, installed_families
from bsscihub.store import Store, open_store
from tests.helpers import init_home, log_events

pytest_plugins = ["tests.broker"]

PG_ADMIN_URL = os.environ.get("HUBTEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test run, dropped afterwards."""
    try:
        import psycopg

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except Exception as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    # one per pytest-xdist worker too (each is a session of its own); the worker's name says whose it is
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"bsscihub_test_{worker}_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_pg_schema(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on both backends; PostgreSQL gets an empty schema per test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hub.sqlite"
    url: str = request.getfixturevalue("postgres_url")
    _reset_pg_schema(url)
    return url


def make_config(tmp_path: Path, **overrides: Any) -> HubConfig:
    """A HubConfig rooted in tmp_path; overrides use the YAML shape, e.g. mqtt={"url": ...}."""
    import yaml

    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "var"),
        "web": {"listen": "tcp:0:interface=127.0.0.1"},
        "bssci": {"listen": "tcp:0:interface=127.0.0.1"},
        # Never the machine's own broker: tests that need one pass a fixture's URL.
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, environ={}, family_sections=all_config_sections(installed_families()))


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    from twisted.internet import reactor

    s = open_store(database_url, tmp_path / "hub.sqlite", reactor)
    s.start()
    yield s
    pytest_twisted.blockon(s.stop())


@pytest.fixture
def two_pg_stores(postgres_url: str, tmp_path: Path) -> Iterator[list[Store]]:
    """Two stores on one empty PostgreSQL schema, as two hubs of a cluster have (e.g. to make them deadlock)."""
    from twisted.internet import reactor

    _reset_pg_schema(postgres_url)
    stores = [open_store(postgres_url, tmp_path / "unused.sqlite", reactor) for _ in range(2)]
    for s in stores:
        s.start()
    yield stores
    for s in stores:
        pytest_twisted.blockon(s.stop())


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every twisted.logger event emitted during the test."""
    with log_events() as events:
        yield events


@pytest.fixture(scope="session")
def initialised_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `bsscihub init` per session (per xdist worker): two RSA keys, a password hash, the schema."""
    return init_home(tmp_path_factory.mktemp("initialised"))


@pytest.fixture
def home(tmp_path: Path, initialised_home: Path) -> Path:
    """A directory after `bsscihub init` (certificates, schema, admin user), for a hub under twistd."""
    shutil.copytree(initialised_home, tmp_path, dirs_exist_ok=True)  # copy2: the keys stay 0600
    return tmp_path


@pytest.fixture
def log(home: Path) -> Iterator[Path]:
    """Where hubs under twistd write their output; printed at teardown, so a failure shows it."""
    path = home / "hub.log"
    yield path
    if path.exists():
        print(path.read_text())
