"""The configuration's documentation against the code: etc/hub.yaml, README and docs/configuration.md.

Every key the hub reads is documented with its real default, and nothing documented is a key it does not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import yaml

from bsscihub.config import CORE_SECTIONS, HUB_SECTIONS, TOP_LEVEL, load_config
from bsscihub.family import all_config_sections, installed_families

REPO = Path(__file__).resolve().parents[1]
HUB_YAML = REPO / "etc" / "hub.yaml"
REFERENCE = REPO / "docs" / "configuration.md"
README = REPO / "README.rst"
SECTIONS: dict[str, type] = {**CORE_SECTIONS, **HUB_SECTIONS, **all_config_sections(installed_families())}


def code_keys() -> set[str]:
    keys = set(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        keys.update(f"{name}.{field.name}" for field in attrs.fields(cls))
    return keys


def yaml_keys(raw: dict[str, Any]) -> set[str]:
    keys = set()
    for name, value in raw.items():
        if isinstance(value, dict) and name in SECTIONS:
            keys.update(f"{name}.{key}" for key in value)
        else:
            keys.add(name)
    return keys


def reference_rows() -> dict[str, str]:
    """key -> default cell of the tables in docs/configuration.md."""
    rows = {}
    for line in REFERENCE.read_text().splitlines():
        match = re.match(r"\| `([a-z_.]+)` \| (.*?) \| .+ \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def parse(key: str, cell: str) -> Any:
    """A default cell read by the key's own parser, as if it were written in the file."""
    if cell in ("empty", "empty list", "unset"):
        return {"empty": "", "empty list": [], "unset": None}[cell]
    return yaml.safe_load(cell.strip("`"))


def test_every_key_in_etc_hub_yaml_is_one_the_hub_reads() -> None:
    raw = yaml.safe_load(HUB_YAML.read_text())
    unknown = yaml_keys(raw) - code_keys()
    assert not unknown, f"etc/hub.yaml names keys the hub does not read: {sorted(unknown)}"
    # families is documented commented out (unset means every installed family)
    missing = code_keys() - yaml_keys(raw) - {"families"}
    assert not missing, f"keys missing from etc/hub.yaml: {sorted(missing)}"
    assert "# families:" in HUB_YAML.read_text()


def test_every_key_of_etc_hub_yaml_has_a_comment_in_its_block() -> None:
    lines = HUB_YAML.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^( {2})?[a-z_]+:", line) and not line.rstrip().endswith(":"):
            block = lines[max(0, number - 12) : number]
            assert any(item.strip().startswith("#") for item in block), f"no comment near line {number + 1}: {line}"


def test_reference_page_lists_every_key_once_with_its_real_default() -> None:
    rows = reference_rows()
    assert set(rows) == code_keys(), (
        f"missing from docs/configuration.md: {sorted(code_keys() - set(rows))}; "
        f"not keys: {sorted(set(rows) - code_keys())}"
    )
    defaults = load_config(None, environ={}, family_sections=SECTIONS)
    for key, cell in rows.items():
        section, _, name = key.rpartition(".")
        value = parse(key, cell)
        if key == "families":
            assert value is None and defaults.families is None
            continue
        raw = {section: {name: value}} if section else {key: value}
        from_doc = _load_raw(raw)
        owner, default_owner = (
            (from_doc.section(section), defaults.section(section)) if section else (from_doc, defaults)
        )
        assert getattr(owner, name) == getattr(default_owner, name), f"{key}: documented {cell}"


def _load_raw(raw: dict[str, Any]) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        yaml.safe_dump(raw, handle)
        handle.flush()
        return load_config(Path(handle.name), environ={}, family_sections=SECTIONS)


def test_readme_key_table_names_only_real_keys_and_links_the_reference() -> None:
    text = README.read_text()
    assert "docs/configuration.md" in text
    table = text.split("The main keys", 1)[1].split("\n\n", 2)[1]
    named = set()
    for cell in re.findall(r"^``([a-z_./]+)``", table, re.MULTILINE):
        head, _, rest = cell.partition("/")
        named.add(head)
        section = head.rpartition(".")[0]
        for other in filter(None, rest.split("/")):
            named.add(f"{section}.{other}" if section else other)
    assert named, "README's key table was not found"
    assert named <= code_keys(), sorted(named - code_keys())


def readme_key_defaults() -> dict[str, str]:
    """key -> the literal of its default cell in README's table of main keys ("``log.level``/``format``" with
    "``info`` / ``text``" gives both); cells that are prose, or name another key, are left out."""
    table = README.read_text().split("The main keys", 1)[1].split("\n\n", 2)[1].splitlines()
    key_end = table[0].index(" ")
    default_start = key_end + len(table[0][key_end:]) - len(table[0][key_end:].lstrip())
    default_end = table[0].index(" ", default_start)
    found = {}
    for line in table:
        if not line.startswith("``"):
            continue
        head, _, rest = line[:key_end].strip().replace("``", "").partition("/")
        section = head.rpartition(".")[0]
        keys = [head, *(f"{section}.{other}" if section else other for other in filter(None, rest.split("/")))]
        cells = line[default_start:default_end].strip().split(" / ")
        if len(cells) == len(keys):
            literals = [re.match(r"``(.+?)``", cell) for cell in cells]
            found.update((key, literal.group(0)) for key, literal in zip(keys, literals, strict=True) if literal)
    return found


def test_readme_key_table_gives_the_real_defaults() -> None:
    found = readme_key_defaults()
    assert {"bssci.listen", "mqtt.url", "log.format", "mioty.vm_mac_types"} <= set(found), sorted(found)
    defaults = load_config(None, environ={}, family_sections=SECTIONS)
    for key, cell in found.items():
        section, _, name = key.rpartition(".")
        if key == "keys_dir":  # ``data_dir``: the same directory as data_dir
            assert cell == "``data_dir``" and defaults.keys_dir == defaults.data_dir
            continue
        value = parse(key, cell)
        from_doc = _load_raw({section: {name: value}} if section else {key: value})
        owner, default = (from_doc.section(section), defaults.section(section)) if section else (from_doc, defaults)
        assert getattr(owner, name) == getattr(default, name), f"README.rst: {key} documented {cell}"


# Written like a key and not one: certificate binding kinds, audit actions and a key file.
NOT_KEYS = {"bssci.station", "scaci.ac", "gate.command", "gate.register", "gate.rename", "gate.key"}


def cited_keys(text: str) -> set[str]:
    """`section.key` (or ``section.key``) of a configuration section in a document's prose, modules left out."""
    sections = "|".join(map(re.escape, SECTIONS))
    found = re.findall(rf"(?<![\w/.$-])(`{{1,2}})((?:{sections})\.[a-z_]+)\1", text)
    return {key for _, key in found if not key.endswith(".py")} - NOT_KEYS


def test_every_key_the_docs_name_in_their_prose_exists() -> None:
    documents = [README, REPO / "CHANGELOG.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    unknown = {str(doc.relative_to(REPO)): sorted(cited_keys(doc.read_text()) - code_keys()) for doc in documents}
    assert not any(unknown.values()), {doc: keys for doc, keys in unknown.items() if keys}
    assert cited_keys("``mioty.dedup_window`` and `web.no_such_key`, `bsscihub/web.py`") == {
        "mioty.dedup_window",
        "web.no_such_key",
    }
