"""What the documentation cites exists: every test file, test function and test module, and every REST route.

A document that says "tests/test_x.py proves this" is only as true as that test; a renamed or removed one fails here.
The map of the code (docs/architecture.md) is held the same way: every module path and interface it names exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bsscihub.family import installed_families
from bsscihub.hub import make_hub
from bsscihub.web.app import WebApp
from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    REPO / "README.rst", REPO / "CHANGELOG.md", REPO / "bench" / "README.md", REPO / "etc" / "hub.yaml",
    *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "deploy").iterdir()), *sorted(REPO.glob("examples/*/*.md")),
]  # fmt: skip
# The example families' own tests are cited by their path inside the example (docs/families.md).
TEST_ROOTS = [REPO, *sorted(p for p in REPO.glob("examples/*") if p.is_dir())]
CITED_PATH = re.compile(r"\btests/[\w/.]*\w(?:::\w+)?")
CITED_NAME = re.compile(r"(?<![\w/])test_\w+")


def all_test_files() -> list[Path]:
    return [path for root in TEST_ROOTS for path in root.glob("tests/**/*.py")]


def defined_tests(path: Path) -> set[str]:
    return set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.MULTILINE))


def citations(pattern: re.Pattern[str]) -> dict[str, list[str]]:
    """What each document cites by the pattern, with where: citation -> ["docs/x.md:12", ...]."""
    found: dict[str, list[str]] = {}
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text().splitlines(), start=1):
            for match in pattern.findall(line):
                found.setdefault(match.rstrip("."), []).append(f"{document.relative_to(REPO)}:{number}")
    return found


def missing_paths(cited: dict[str, list[str]]) -> dict[str, list[str]]:
    missing = {}
    for citation, places in cited.items():
        path, _, name = citation.partition("::")
        files = [root / path for root in TEST_ROOTS if (root / path).exists()]
        if not files or (name and not any(name in defined_tests(file) for file in files if file.is_file())):
            missing[citation] = places
    return missing


def missing_names(cited: dict[str, list[str]]) -> dict[str, list[str]]:
    """A bare test_x must be a test module (test_x.py) or a test function somewhere in the tests."""
    files = all_test_files()
    known = {file.stem for file in files} | set().union(*(defined_tests(file) for file in files))
    return {name: places for name, places in cited.items() if name.removesuffix(".py") not in known}


def test_every_test_file_and_function_the_docs_cite_exists() -> None:
    cited = citations(CITED_PATH)
    assert "tests/test_cluster_docs.py" in cited, "the documents' citations were not found"
    missing = missing_paths(cited)
    assert not missing, f"the docs cite tests that do not exist: {missing}"


def test_every_test_name_the_docs_cite_exists() -> None:
    cited = citations(CITED_NAME)
    assert cited, "the documents' test names were not found"
    missing = missing_names(cited)
    assert not missing, f"the docs name tests that do not exist: {missing}"


def test_a_citation_of_a_test_that_does_not_exist_is_found() -> None:
    """The checks above can fail: a renamed test, file or function, is reported with its place."""
    assert missing_paths({"tests/test_no_such_file.py": ["x:1"]}) == {"tests/test_no_such_file.py": ["x:1"]}
    gone = "tests/test_cluster_docs.py::test_no_such_function"
    assert missing_paths({gone: ["x:2"]}) == {gone: ["x:2"]}
    assert missing_paths({"tests/test_cluster_docs.py": ["x:3"], "tests/test_hello.py": ["x:4"]}) == {}
    assert missing_names({"test_no_such_name": ["x:5"], "test_cluster_docs": ["x:6"]}) == {"test_no_such_name": ["x:5"]}


# -- docs/architecture.md, the map of the code: the modules and interfaces it names exist.

ARCHITECTURE = REPO / "docs" / "architecture.md"
CITED_MODULE = re.compile(r"\bbsscihub/[\w/.]*\w/?")
CITED_INTERFACE = re.compile(r"`(I[A-Z][A-Za-z]+)`")


def known_interfaces() -> set[str]:
    """Interface names the package defines (class I...), or imports from Twisted or zope, which it implements."""
    names: set[str] = set()
    for path in (REPO / "bsscihub").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.ImportFrom):
                names.update(alias.asname or alias.name for alias in node.names)
    return {name for name in names if re.fullmatch(r"I[A-Z][A-Za-z]+", name)}


CITED_FILE_NAME = re.compile(r"`(\w+\.py)`")
"""A module named inside a section about one package (`uplinks.py` under bsscihub/protocols/bssci/)."""


def missing_modules(cited: dict[str, list[str]]) -> dict[str, list[str]]:
    return {path: places for path, places in cited.items() if not (REPO / path).exists()}


def missing_file_names(cited: dict[str, list[str]]) -> dict[str, list[str]]:
    known = {path.name for path in (REPO / "bsscihub").rglob("*.py")}
    return {name: places for name, places in cited.items() if name not in known}


def missing_interfaces(cited: dict[str, list[str]]) -> dict[str, list[str]]:
    known = known_interfaces()
    return {name: places for name, places in cited.items() if name not in known}


def architecture_citations(pattern: re.Pattern[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for number, line in enumerate(ARCHITECTURE.read_text().splitlines(), start=1):
        for match in pattern.findall(line):
            found.setdefault(match.rstrip("."), []).append(f"docs/architecture.md:{number}")
    return found


def test_every_module_the_architecture_map_cites_exists() -> None:
    cited = architecture_citations(CITED_MODULE)
    assert {"bsscihub/hub.py", "bsscihub/cluster_redis.py", "bsscihub/protocols/bssci/uplinks.py"} <= set(cited)
    missing = missing_modules(cited)
    assert not missing, f"docs/architecture.md cites modules that do not exist: {missing}"
    named = architecture_citations(CITED_FILE_NAME)
    assert {"uplinks.py", "session.py"} <= set(named)
    missing = missing_file_names(named)
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_interface_the_architecture_map_cites_exists() -> None:
    cited = architecture_citations(CITED_INTERFACE)
    assert {"IFamily", "IWebRoutes", "IDedupStore", "ILeaderLease", "ILimiter"} <= set(cited)
    missing = missing_interfaces(cited)
    assert not missing, f"docs/architecture.md names interfaces that do not exist: {missing}"


def test_a_module_or_interface_the_map_cites_that_does_not_exist_is_found() -> None:
    """The checks above can fail: a moved module or a renamed interface is reported with its place."""
    assert missing_modules({"bsscihub/no_such_module.py": ["x:1"], "bsscihub/store/": ["x:2"]}) == {
        "bsscihub/no_such_module.py": ["x:1"]
    }
    assert missing_interfaces({"INoSuchInterface": ["x:3"], "IFamilyService": ["x:4"], "IPlugin": ["x:5"]}) == {
        "INoSuchInterface": ["x:3"]
    }
    assert missing_file_names({"no_such_module.py": ["x:6"], "uplinks.py": ["x:7"]}) == {"no_such_module.py": ["x:6"]}


# -- REST routes

METHOD = r"(?:GET|POST|PUT|PATCH|DELETE)"
CITED_ROUTE = re.compile(rf"(?:\b({METHOD}(?:[|/]{METHOD})*) )?(/api/[\w{{}}./-]*[\w}}])")
RELATIVE_ROUTE = re.compile(rf"\b({METHOD}(?:[|/]{METHOD})*) (/[\w{{}}./-]*)")
# A family's paragraph lists its routes relative to its root ("REST (`/api/v1/ble`): `GET /gateways`, ..."),
# docs/gate.md a whole section ("## REST (`/api/v1/gates`, ...)" and a table of `POST /gates/register` ...).
REST_ROOT = re.compile(
    r"^REST \(`(/api/v1/[\w-]+)`\):(.*?)(?=\n\n)|^#+ REST \(`(/api/v1/[\w-]+)`.*?\n(.*?)(?=^#)", re.S | re.M
)


def route_citations() -> dict[tuple[str, str], list[str]]:
    """(method or "", path as cited) -> where, for every /api/ path and every route of a REST section."""
    found: dict[tuple[str, str], list[str]] = {}
    for document in DOCUMENTS:
        text = document.read_text()
        where = str(document.relative_to(REPO))
        for methods, path in CITED_ROUTE.findall(text):
            if path == "/api/v1":
                continue  # the API's root, named as a prefix
            for method in re.split(r"[|/]", methods) if methods else [""]:
                found.setdefault((method, path.removesuffix(".")), []).append(where)
        for match in REST_ROOT.finditer(text):
            root, section = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            for methods, path in RELATIVE_ROUTE.findall(section):
                if path.startswith("/api/"):
                    continue  # cited in full, above
                # gate.md's table names its routes from /gates on, the families' sections from below their root
                full = f"/api/v1{path}" if path.startswith(root.removeprefix("/api/v1") + "/") else root + path
                for method in re.split(r"[|/]", methods):
                    found.setdefault((method, full.split("?")[0].rstrip("/")), []).append(where)
    return found


def same_route(cited: str, served: str, *, any_name: bool = False) -> bool:
    """Segment by segment equal, where a served {name} takes any cited value or name; a cited {name} matches
    only a served one, unless `any_name` (a root such as /api/v1/{name} stands for every family's)."""
    a, b = cited.split("/"), served.split("/")
    if len(a) != len(b):
        return False
    return all(x == y or y.startswith("{") or (any_name and x.startswith("{")) for x, y in zip(a, b, strict=True))


def unserved(cited: dict[tuple[str, str], list[str]], served: dict[str, set[str]]) -> dict[str, list[str]]:
    """The citations no served route answers, by path or by method."""
    missing = {}
    for (method, path), places in cited.items():
        methods = set().union(*(methods for route, methods in served.items() if same_route(path, route)))
        # A path cited without a method may name the root of routes ("/api/v1/ble", "/api/v1/{name}").
        depth = path.count("/") + 1
        root = not method and any(
            same_route(path, "/".join(route.split("/")[:depth]), any_name=True) for route in served
        )
        if not (methods or root) or (method and method not in methods):
            missing[f"{method} {path}".strip()] = places
    return missing


def served_routes(tmp_path: Path) -> dict[str, set[str]]:
    """path -> methods of every route of every installed family and of the core's alerts and webhooks, as
    twistd mounts them (the services are built, never started)."""
    from twisted.application.service import MultiService
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from bsscihub.tap import install_integrations

    hub = make_hub(make_config(tmp_path), reactor, installed_families())
    install_integrations(hub, MultiService())
    web = WebApp(hub, clock=Clock())
    try:
        served: dict[str, set[str]] = {}
        for bound in web.routes:
            served.setdefault(bound.route.path.rstrip("/"), set()).add(bound.route.method)
        for rule in web.app.url_map.iter_rules():  # the app's own: /health, /metrics, /api/docs
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).rstrip("/")
            served.setdefault(path, set()).update(rule.methods or ())
        # The example family's routes (docs/families.md), served once it is installed.
        for source in REPO.glob("examples/*/*/__init__.py"):
            family = source.parent.name.removesuffix("_family")
            for method, path in re.findall(r'api_route\("(\w+)", "([^"]+)"', source.read_text()):
                served.setdefault(f"/api/v1/{family}{path}", set()).add(method)
        return served
    finally:
        web.stop()


def test_every_rest_route_the_docs_cite_is_served(tmp_path: Path) -> None:
    served = served_routes(tmp_path)
    assert "/api/v1/alert-rules" in served and "/api/v1/gates/mine" in served and "/ws" in served
    cited = route_citations()
    assert ("POST", "/api/v1/devices/register") in cited and ("GET", "/api/v1/gates/mine") in cited
    assert ("GET", "/api/v1/ble/nodes/{mac}/readings") in cited
    missing = unserved(cited, served)
    assert not missing, f"the docs cite REST routes the hub does not serve: {missing}"


def test_a_cited_route_the_hub_does_not_serve_is_found(tmp_path: Path) -> None:
    served = served_routes(tmp_path)
    cited = {
        ("PATCH", "/api/v1/mioty/network"): ["x"],
        ("GET", "/api/v1/no/such"): ["y"],
        ("GET", "/api/v1/mioty/sensors/0011223344556677/uplinks"): ["z"],
        ("", "/api/v1/gates/{id}"): ["w"],
        ("GET", "/api/v1/gates/{id}/state"): ["v"],  # not /gates/files/{file_id}: a cited {id} is no literal
    }
    assert unserved(cited, served) == {
        "PATCH /api/v1/mioty/network": ["x"],
        "GET /api/v1/no/such": ["y"],
        "GET /api/v1/gates/{id}/state": ["v"],
    }


# -- CHANGELOG's list of the migrations since 0.1.0

RELEASED = {("core", 1), ("core", 2), ("ble", 1), ("devices", 1), ("gate", 1), ("mioty", 1), ("mioty", 2)}
"""The migrations 0.1.0 had: what its CHANGELOG entry does not list as new."""


def changelog_migrations(text: str) -> set[tuple[str, int]]:
    """(component, version) of the Unreleased entry's "New migrations: core 3 and 4, web 1 (...); mioty 3, ..."."""
    listed = re.sub(r"\([^)]*\)", "", text.split("New migrations:", 1)[1].split(".\n", 1)[0])
    found, component = set(), ""
    for word in re.findall(r"[a-z_]+|\d+", listed):
        if word.isdigit():
            found.add((component, int(word)))
        elif word != "and":
            component = word
    return found


def test_the_changelog_lists_every_migration_since_the_last_release(tmp_path: Path) -> None:
    from twisted.internet import reactor

    hub = make_hub(make_config(tmp_path), reactor, installed_families())
    applied = {(m.component, m.version) for m in hub.migrations()}
    assert RELEASED <= applied
    unreleased = (REPO / "CHANGELOG.md").read_text().split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    listed = changelog_migrations(unreleased)
    assert listed == applied - RELEASED, (
        f"CHANGELOG's new migrations: missing {sorted(applied - RELEASED - listed)}, not migrations "
        f"{sorted(listed - (applied - RELEASED))}"
    )
    assert changelog_migrations("New migrations: core 3 and 4, web 1 (x); mioty 3, 4 and 6.\n") == {
        ("core", 3),
        ("core", 4),
        ("web", 1),
        ("mioty", 3),
        ("mioty", 4),
        ("mioty", 6),
    }
