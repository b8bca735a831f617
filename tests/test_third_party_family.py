"""The example third-party family (examples/hello_family) installed as a user would: the hub and the
example pip-installed from local paths into a fresh virtualenv, then run there under twistd with a
real broker: its topic, command, REST route, page, CLI command and its own contract test."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import shutil
import site
import subprocess
import time
import urllib.request
import venv
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hello_family"
HUB_FILES = ("bsscihub", "twisted", "setup.cfg", "pyproject.toml", "README.rst", "LICENSE", "MANIFEST.in")


def _copy(source: Path, target: Path) -> Path:
    """A clean copy to build from (a build writes build/ and *.egg-info next to the sources)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    target.mkdir(parents=True)
    for name in os.listdir(source):
        if source != REPO or name in HUB_FILES:
            path = source / name
            if path.is_dir():
                shutil.copytree(path, target / name, ignore=ignore)
            else:
                shutil.copy2(path, target / name)
    return target


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the hub and the example installed (not editable) from local copies.

    The dependencies (Twisted, klein, ...) are not downloaded again: they come from the test-suite's
    own environment through a path file, so pip finds them satisfied; only the build backend is
    fetched (into pip's isolated build environment, from pip's configured index or cache). The hub
    itself and the family are real installs into the new environment, found before anything else.
    pip itself comes the same way, so the environment is made without ensurepip (~5 s): run with the
    new interpreter, pip installs into that interpreter's environment."""
    root = tmp_path_factory.mktemp("thirdparty")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Plain paths only: the .pth files there (our own editable install among them) are not read.
    Path(purelib, "deps-from-tests.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    hub, example = _copy(REPO, root / "hub"), _copy(EXAMPLE, root / "hello_family")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--disable-pip-version-check",
         str(hub), str(example)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BSSCIHUB_", "PYTHON"))}
    return subprocess.run(args, cwd=cwd, env={**clean, **env, "PATH": f"{env_dir / 'bin'}:{clean['PATH']}"},
                          capture_output=True, text=True, timeout=300)


def test_the_installed_hub_and_family_are_the_new_environment_s(fresh: Path, tmp_path: Path) -> None:
    code = ("import bsscihub, hello_family; from bsscihub.family import installed_families;"
            "print(bsscihub.__file__); print(hello_family.__file__); print(sorted(installed_families()))")
    out = _run(fresh, str(fresh / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hub_file, family_file, families = out.stdout.splitlines()
    assert hub_file.startswith(str(fresh)) and family_file.startswith(str(fresh)), out.stdout
    assert "'hello'" in families and "'mioty'" in families


def test_its_own_contract_test_passes_there(fresh: Path, tmp_path: Path) -> None:
    tests = shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    out = _run(fresh, str(fresh / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_it_runs_in_the_hub(fresh: Path, tmp_path: Path, mosquitto: Mosquitto, subscriber_factory: Any) -> None:
    config = tmp_path / "hub.yaml"
    web = free_port()
    config.write_text(json.dumps({
        "families": ["hello"], "data_dir": str(tmp_path / "data"),
        "web": {"listen": f"tcp:{web}:interface=127.0.0.1"},
        "mqtt": {"url": f"mqtt://{mosquitto.host}:{mosquitto.port}", "prefix": "hubtest"},
        "hello": {"greeting": "hi there"},
    }))
    bsscihub = str(fresh / "bin" / "bsscihub")
    greeted = _run(fresh, bsscihub, "hello", "world", "--config", str(config), cwd=tmp_path)
    assert (greeted.returncode, greeted.stdout) == (0, "hi there, world\n"), greeted.stderr
    init = _run(fresh, bsscihub, "init", "--config", str(config), cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    password = init.stdout.split("its password (shown only now): ", 1)[1].split()[0]

    witness = subscriber_factory(mosquitto, "hubtest/hello/#")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BSSCIHUB_", "PYTHON"))}
    twistd = [str(fresh / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()"]
    hub = subprocess.Popen([*twistd, "-n", "--pidfile=", "bsscihub", "--config", str(config)],
                           cwd=tmp_path, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        token = _login(web, password, hub)
        import paho.mqtt.publish as publish

        deadline = time.monotonic() + 30
        while not _on(witness, GREETED) and time.monotonic() < deadline:  # until the hub has subscribed
            publish.single("hello/dev-1/in", "{}", qos=1, hostname=mosquitto.host, port=mosquitto.port)
            with contextlib.suppress(TimeoutError):  # woken by the greeting, else published again
                witness.wait_for(lambda m: m.topic == GREETED, timeout=0.5)
        payload = _on(witness, GREETED)[0]
        assert (payload["id"], payload["greeting"]) == ("dev-1", "hi there")

        publish.single("hubtest/hello/thing/dev-1/cmd/ping", "{}", qos=1, hostname=mosquitto.host,
                       port=mosquitto.port)
        witness.wait_for(lambda m: m.topic == "hubtest/hello/thing/dev-1/event/cmd_result", timeout=30)
        [result] = _on(witness, "hubtest/hello/thing/dev-1/event/cmd_result")
        assert result == {"pong": "dev-1", "command": "ping", "ok": True, "error": None}

        things = _get(web, "/api/v1/hello/things", token)
        assert [t["id"] for t in json.loads(things)["items"]] == ["dev-1"]
        page = _page(web, password, "/hello")
        assert 'id="hello-greeting">The hub answers: hi there<' in page and "dev-1" in page
        assert "/hello/things" in json.loads(_get(web, "/api/v1/openapi.json", token))["paths"]
    finally:
        hub.terminate()
        output = hub.communicate(timeout=30)[0]
    assert "hello" in output and "Traceback" not in output, output


GREETED = "hubtest/hello/thing/dev-1/greeted"


def _on(witness: Any, topic: str) -> list[Any]:
    return [json.loads(m.payload) for m in witness.messages if m.topic == topic]


def _login(port: int, password: str, process: subprocess.Popen[str]) -> str:
    body = json.dumps({"username": "admin", "password": password}).encode()
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/auth/token", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                return str(json.load(r)["token"])
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _page(port: int, password: str, path: str) -> str:
    """A page as a browser gets it: logged in with the session cookie."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    body = json.dumps({"username": "admin", "password": password}).encode()
    opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/auth/login", data=body,
                                       headers={"Content-Type": "application/json"}), timeout=10).close()
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return str(r.read().decode())


def _get(port: int, path: str, token: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()
