"""Per-unit broker credentials of the gate family: one dynamic-security client and role per gate unit.

The broker side is bsscihub.mqtt.dynsec (shared with other families); this module says what a unit may reach.
"""

from __future__ import annotations

from typing import Any

import attrs

from bsscihub.mqtt.dynsec import DynsecClient, DynsecError
from bsscihub.mqtt.dynsec import NoProvisioning as _NoAccounts

__all__ = ["DynsecError", "DynsecProvisioner", "NoProvisioning", "UnitTopics", "unit_username"]


def unit_username(hardware_id: str) -> str:
    # Keyed by the immutable hardware id: a rename changes only the role's topics, never the login.
    return f"gate-{hardware_id}"


@attrs.frozen
class UnitTopics:
    status: str
    commands: str

    @classmethod
    def of(cls, root: str, controller_id: str) -> UnitTopics:
        return cls(f"{root}/{controller_id}/status", f"{root}/{controller_id}/commands")

    def acls(self) -> list[dict[str, Any]]:
        """Exactly this unit's topics: publish its status, subscribe to and receive its commands.

        The receive rule denies everything else explicitly: a subscription kept in a persistent
        session from before a rename must not deliver the old name's commands to this unit.
        """
        return [
            {"acltype": "publishClientSend", "topic": self.status, "priority": 10, "allow": True},
            {"acltype": "subscribeLiteral", "topic": self.commands, "priority": 10, "allow": True},
            {"acltype": "publishClientReceive", "topic": self.commands, "priority": 10, "allow": True},
            {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False},
        ]


class DynsecProvisioner(DynsecClient):
    """Unit accounts: created at registration, re-keyed at re-registration, moved by a rename, deleted."""

    async def provision(self, username: str, password: str, topics: UnitTopics) -> None:
        await self.set_account(username, password, topics.acls(), "gate unit")

    async def move(self, username: str, topics: UnitTopics) -> None:
        await self.set_role(username, topics.acls(), f"gate unit {topics.status}")


class NoProvisioning(_NoAccounts):
    """`gate.broker_provisioning: none`: the operator manages broker accounts and ACLs."""

    async def provision(self, username: str, password: str, topics: UnitTopics) -> None:
        pass

    async def move(self, username: str, topics: UnitTopics) -> None:
        pass
