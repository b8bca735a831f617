"""The core/family boundary: the core imports no family module, and the families' optional
features are declared interfaces, checked with verifyObject."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from zope.interface.verify import verifyObject

from bsscihub.cli import build_parser, family_commands
from bsscihub.family import (
    CLICommand,
    ICertificateBindings,
    ICertificateRevocation,
    ICommandLine,
    IDashboardSummary,
    IReceivers,
    IRootRoutes,
    IWebExtension,
    IWebRoutes,
    binding_kinds,
    installed_families,
)

PACKAGE = Path(__file__).resolve().parents[1] / "bsscihub"
FAMILY_DIRS = ("protocols", "plugins")
"""protocols/: the families' code; plugins/: each family's small entry point, found by twisted.plugin."""


def core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in FAMILY_DIRS)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports (absolute names; relative imports resolved), with its line."""
    package = ".".join(("bsscihub", *path.relative_to(PACKAGE).parent.parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_the_walk_sees_the_whole_core() -> None:
    names = {str(p.relative_to(PACKAGE)) for p in core_modules()}
    assert {"cli.py", "tap.py", "hub.py", "mqtt/bridge.py", "web/app.py", "store/schema.py"} <= names
    assert not any(n.startswith(FAMILY_DIRS) for n in names)
    # and it would see a family import, were there one
    plugin = imported_names(PACKAGE / "plugins" / "mioty.py")
    assert any(name.startswith("bsscihub.protocols.bssci") for _, name in plugin)


def test_the_core_imports_no_family_module() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        for path in core_modules()
        for line, name in imported_names(path)
        # the bsscihub.plugins package itself is where discovery looks; its modules are the families'
        if name.startswith(("bsscihub.protocols", "bsscihub.plugins."))
    ]
    assert offenders == []


def family_of(name: str) -> str | None:
    """The family package a module name belongs to (bsscihub.protocols.<family>...), else None."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["bsscihub", "protocols"] else None


def family_modules() -> list[Path]:
    return sorted((PACKAGE / "protocols").rglob("*.py"))


def family_packages() -> set[str]:
    """The packages under protocols/ that a plugin loads: the families. Others there (wmbus) are protocol
    libraries without a plugin, which a family may use."""
    return {f for p in (PACKAGE / "plugins").glob("*.py") for _, name in imported_names(p)
            if (f := family_of(name)) is not None}


def test_the_walk_sees_every_family_and_would_see_one_importing_another() -> None:
    assert {"bssci", "ble", "devices", "gate"} <= family_packages()
    assert "wmbus" not in family_packages()
    # a relative import is resolved to its absolute name, so `from ..devices import x` would be seen too
    assert family_of("bsscihub.protocols.devices.series") == "devices"
    assert family_of("bsscihub.protocols") is None and family_of("bsscihub.series") is None


def test_no_family_imports_another_family() -> None:
    """A family is one package and a plugin: what two families share lives in the core."""
    families, offenders = family_packages(), []
    for path in family_modules():
        own = family_of(".".join(("bsscihub", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for line, name in imported_names(path):
            other = family_of(name)
            if other in families and other != own:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert offenders == []


# Where the core still says a mioty base station's EUI, and why; anything else is a family's word in the core.
BS_EUI_IN_THE_CORE = {
    # the historic migrations: core 2 made the column, core 3 moves it into bindings (bssci.station)
    "store/schema.py": 3,
}


def test_the_core_names_no_base_station_eui() -> None:
    found = {}
    for path in core_modules():
        count = len(re.findall(r"bs_?eui", path.read_text(encoding="utf-8"), re.IGNORECASE))
        if count:
            found[str(path.relative_to(PACKAGE))] = count
    # certificates, their bindings and the web pages for them are among the core modules walked
    assert {"pki.py", "web/certs.py", "web/api.py", "web/pages.py"} <= {str(p.relative_to(PACKAGE))
                                                                       for p in core_modules()}
    assert found == BS_EUI_IN_THE_CORE
    templates = [p.relative_to(PACKAGE) for p in (PACKAGE / "web" / "templates").rglob("*.html")
                 if re.search(r"bs_?eui", p.read_text(encoding="utf-8"), re.IGNORECASE)]
    assert templates == []


@pytest.mark.parametrize("name", sorted(n for n, f in installed_families().items()
                                        if ICertificateBindings.providedBy(f)))
def test_a_family_declaring_certificate_bindings_declares_them_as_such(name: str) -> None:
    from bsscihub.pki import BindingKind

    family = installed_families()[name]
    assert verifyObject(ICertificateBindings, family)
    kinds = family.certificate_bindings()
    assert kinds and all(isinstance(k, BindingKind) for k in kinds)
    # what every installed family declares together: no name, alias, field or URI twice
    assert set(binding_kinds(installed_families())) >= {k.name for k in kinds}


@pytest.mark.parametrize("name", sorted(n for n, f in installed_families().items() if IReceivers.providedBy(f)))
def test_a_family_naming_its_receivers_names_a_field_of_its_receivers_and_a_kind_of_its_topics(name: str) -> None:
    family = installed_families()[name]
    assert verifyObject(IReceivers, family)
    root = getattr(family, "topic_root", None) or name
    receiving = [spec.payload for spec in family.events if '"receivers"' in spec.payload]
    assert receiving, f"{name} names receivers but no event of it lists them"
    field, kind = family.receiver_id
    assert any(f'"{field}"' in payload.split('"receivers"', 1)[1] for payload in receiving), field
    assert any(spec.topic.startswith(f"{root}/{kind}/{{{field}}}/") for spec in family.events), (field, kind)


def test_the_alerts_know_receivers_only_from_the_families() -> None:
    # The stations and gateways of mioty and BLE, and nothing of theirs in the core's alerts.
    assert {n: f.receiver_id for n, f in installed_families().items() if IReceivers.providedBy(f)} == {
        "mioty": ("bsEui", "bs"), "ble": ("gatewayId", "gw")}
    assert not re.search(r"bsEui|gatewayId", (PACKAGE / "alerts.py").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(n for n, f in installed_families().items() if ICommandLine.providedBy(f)))
def test_a_family_providing_cli_commands_provides_them_as_declared(name: str) -> None:
    family = installed_families()[name]
    assert verifyObject(ICommandLine, family)
    for command in family.cli_commands():
        assert isinstance(command, CLICommand)
        assert command.path and all(command.path)


def test_mioty_contributes_its_commands_and_the_core_parser_offers_them() -> None:
    paths = {c.path for f, c in family_commands(installed_families()) if f.name == "mioty"}
    assert {("certs", "issue-bs"), ("sensors",), ("meters",), ("sim",)} <= paths
    args = build_parser().parse_args(["sensors", "export", "--format", "csv"])
    family, command = args.family_command
    assert (family, command.path, args.format) == ("mioty", ("sensors",), "csv")


def test_without_the_family_its_commands_are_gone() -> None:
    others = {n: f for n, f in installed_families().items() if n != "mioty"}
    with pytest.raises(SystemExit):
        build_parser(others).parse_args(["sensors", "export"])
    # The mioty simulator goes with it; the other families' simulators stay under `sim`.
    with pytest.raises(SystemExit):
        build_parser(others).parse_args(["sim", "--base-stations", "2"])
    assert build_parser(others).parse_args(["sim", "devices"]).family_command[0] == "devices"


WEB_FAMILIES = sorted(n for n, f in installed_families().items() if IWebRoutes.providedBy(f))


def test_the_web_families_are_found_by_their_interface() -> None:
    assert {"mioty", "ble", "devices", "gate"} <= set(WEB_FAMILIES)


@pytest.mark.parametrize("name", WEB_FAMILIES)
def test_a_family_web_extension_provides_what_it_declares(name: str) -> None:
    family = installed_families()[name]
    assert verifyObject(IWebRoutes, family)
    extension = family.web_routes(SimpleNamespace(services={}, config=None))
    assert verifyObject(IWebExtension, extension)
    for optional in (IDashboardSummary, ICertificateRevocation, IRootRoutes):
        if optional.providedBy(extension):
            assert verifyObject(optional, extension)
    # one template convention: the family package's templates/{name}/*.html
    directory = Path(str(extension.templates))
    assert directory == PACKAGE.joinpath(*type(extension).__module__.split(".")[1:-1], "templates")
    pages = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.html"))
    assert pages and all(p.startswith(f"{name}/") for p in pages), pages


def test_every_page_a_family_renders_is_in_its_templates() -> None:
    for name in WEB_FAMILIES:
        extension = installed_families()[name].web_routes(SimpleNamespace(services={}, config=None))
        directory = Path(str(extension.templates))
        source = Path(sys.modules[type(extension).__module__].__file__ or "").parent
        named = {m for p in source.glob("*.py") for m in re.findall(r'Page\(\s*"([^"]+\.html)"', p.read_text())}
        assert named, name
        missing = [n for n in named if not (directory / n).is_file()]
        assert missing == [], name
