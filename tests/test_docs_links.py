"""The tests the documentation cites exist: every test file, test function and test module it names.

A document that says "tests/test_x.py proves this" is only as true as that test; a renamed or removed one fails here.
The map of the code (docs/architecture.md) is held the same way: every module path and interface it names exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

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
        "bsscihub/no_such_module.py": ["x:1"]}
    assert missing_interfaces({"INoSuchInterface": ["x:3"], "IFamilyService": ["x:4"], "IPlugin": ["x:5"]}) == {
        "INoSuchInterface": ["x:3"]}
    assert missing_file_names({"no_such_module.py": ["x:6"], "uplinks.py": ["x:7"]}) == {"no_such_module.py": ["x:6"]}
