"""The tests the documentation cites exist: every test file, test function and test module it names.

A document that says "tests/test_x.py proves this" is only as true as that test; a renamed or removed one fails here.
"""

from __future__ import annotations

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
