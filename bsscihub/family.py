"""The device-family plugin boundary: what a family provides and how the hub finds families.

Families are IFamily providers found with twisted.plugin.getPlugins in bsscihub.plugins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.application.service import IService

    from bsscihub.hub import Hub


class IFamily(IPlugin):
    """A device family (mioty, ble, gate, devices, ...)."""

    name = Attribute("Short name: enables the family in `families`, roots its topics and routes.")
    config_sections = Attribute("Mapping of config section name to its attrs class (validated at start).")
    migrations = Attribute("Sequence of bsscihub.store.Migration for the family's tables.")

    def make_service(hub: Hub) -> IService:  # type: ignore[misc]
        """The family's ingress, timers and command handlers, started after storage is ready."""


class UnknownFamily(Exception):
    pass


def installed_families() -> dict[str, IFamily]:
    """Every family plugin installed, by name."""
    import bsscihub.plugins

    found: dict[str, IFamily] = {}
    for family in getPlugins(IFamily, bsscihub.plugins):
        found.setdefault(family.name, family)
    return found


def all_config_sections(families: Mapping[str, IFamily]) -> dict[str, type]:
    sections: dict[str, type] = {}
    for family in families.values():
        sections.update(family.config_sections)
    return sections


def enabled_families(installed: Mapping[str, IFamily], names: tuple[str, ...] | None) -> dict[str, IFamily]:
    """The families named in the config (all installed ones when it names none)."""
    if names is None:
        return dict(sorted(installed.items()))
    unknown = [n for n in names if n not in installed]
    if unknown:
        raise UnknownFamily(unknown[0])
    return {n: installed[n] for n in names}
