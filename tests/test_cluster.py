"""The cluster seams (dedup store, station ownership, command routing): the local parts are one hub's
behaviour, and the mioty family reaches its dedup store, stations and station commands only through them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from bsscihub.cluster import (
    FIRST,
    LATE,
    MERGED,
    Cluster,
    ICommandRouter,
    IDedupStore,
    IStationOwnership,
    LocalOwnership,
    LocalRouter,
    NoRoute,
)
from bsscihub.family import installed_families
from bsscihub.hub import make_hub
from bsscihub.protocols.bssci.dedup import Copy, Deduplicator
from bsscihub.protocols.bssci.messages import UlData
from bsscihub.tap import require_node_name
from tests.conftest import make_config
from tests.test_mioty_service import EP, KEY, PKI, A, heard, pki, start, wait_for

__all__ = ["pki"]  # the module-scoped certificates fixture, shared with test_mioty_service

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def _copy(bs: str, snr: float, rx_time: int = 1_000) -> Copy:
    msg = UlData(opId=0, epEui=1, rxTime=rx_time, packetCnt=7, snr=snr, rssi=-100.0, userData=b"\x01")
    return Copy(bs, 0.0, msg)


def test_the_local_parts_provide_the_interfaces() -> None:
    clock = Clock()
    emitted: list[tuple[Any, list[Copy]]] = []
    dedup = Deduplicator(clock, 0.5, 10, lambda key, copies, first: emitted.append((key, copies)))
    assert verifyObject(IDedupStore, dedup)
    assert verifyObject(IStationOwnership, LocalOwnership("n1"))
    assert verifyObject(ICommandRouter, LocalRouter())
    # The interface's answers are the store's.
    assert dedup.add(("01", 7), _copy(A, 1.0)) == FIRST
    assert dedup.add(("01", 7), _copy("bb", 2.0)) == MERGED
    clock.advance(0.6)
    assert [(key, [c.bs_eui for c in copies]) for key, copies in emitted] == [(("01", 7), [A, "bb"])]
    assert dedup.add(("01", 7), _copy("cc", 3.0)) == LATE


def test_local_ownership_holds_what_this_hub_claimed_until_released() -> None:
    owned = LocalOwnership("hub-1")
    lost: list[str] = []
    assert owned.owner("mioty", A) is None
    owned.claim("mioty", A, lost.append)
    assert owned.owner("mioty", A) == "hub-1" and owned.owner("ble", A) is None
    owned.release("mioty", A)
    assert owned.owner("mioty", A) is None and lost == []


def test_local_router_runs_the_family_handler_here_and_refuses_an_unknown_family() -> None:
    router = LocalRouter()
    calls: list[tuple[str, str, Any]] = []

    async def handler(station: str, name: str, args: Any) -> dict[str, Any]:
        calls.append((station, name, args))
        return {"ok": name}

    router.register("mioty", handler)
    results: list[Any] = []
    router.route("mioty", A, "poll_status", None).addCallback(results.append)
    assert results == [{"ok": "poll_status"}] and calls == [(A, "poll_status", None)]
    # One hub: a call to any hub runs here, a broadcast reaches nobody else, no other hub runs.
    router.call("hub-9", "mioty", "which", 1).addCallback(results.append)
    router.broadcast("mioty", "which", 2).addCallback(results.append)
    router.alive("hub-9").addCallback(results.append)
    assert results[1:] == [{"ok": "which"}, [], False] and calls[1:] == [("", "which", 1)]
    failures: list[Any] = []
    router.route("ble", A, "poll_status", None).addErrback(failures.append)
    assert failures[0].check(NoRoute) and "no ble handler" in failures[0].getErrorMessage()


def test_one_hub_is_local_by_default(tmp_path: Path) -> None:
    hub = make_hub(make_config(tmp_path, families=["mioty"]), Clock(), {"mioty": installed_families()["mioty"]})
    assert not hub.cluster.clustered and hub.cluster.make_dedup is None
    assert isinstance(hub.cluster.ownership, LocalOwnership) and isinstance(hub.cluster.router, LocalRouter)
    from bsscihub.protocols.bssci.service import MiotyService

    service = MiotyService(hub)
    # Today's in-memory store: no extra work per copy.
    assert type(service.dedup) is Deduplicator


class _RecordingStore(Deduplicator):
    """A dedup store handed in by the cluster: it sees every stored copy."""

    seen: list[tuple[Any, str]] = []

    def __init__(self, clock: Any, window: float, memory: int, emit: Any, *, late: Any, codec: Any) -> None:
        super().__init__(clock, window, memory, emit)
        # What a shared store is handed: copies found late after the fact, and copies as text.
        assert callable(late) and codec[1](codec[0](_copy(A, 1.5))).bs_eui == A

    def add(self, key: Any, copy: Any) -> int:
        self.seen.append((key, copy.bs_eui))
        return super().add(key, copy)


class _Ownership(LocalOwnership):
    """Keeps the callbacks, as a shared registry would, to say when another hub claimed a station."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.log: list[tuple[str, str]] = []
        self.lost: dict[str, Any] = {}

    def claim(self, family: str, station: str, on_lost: Any) -> None:
        super().claim(family, station, on_lost)
        self.log.append(("claim", station))
        self.lost[station] = on_lost

    def release(self, family: str, station: str) -> None:
        super().release(family, station)
        self.log.append(("release", station))


class _Router(LocalRouter):
    def __init__(self) -> None:
        super().__init__()
        self.routed: list[tuple[str, str, str]] = []

    def route(self, family: str, station: str, name: str, args: Any) -> Deferred[Any]:
        self.routed.append((family, station, name))
        return super().route(family, station, name, args)


@pytest_twisted.ensureDeferred
async def test_the_family_uses_the_dedup_store_ownership_and_router_it_is_given(tmp_path: Path, pki: PKI) -> None:
    _RecordingStore.seen = []
    ownership, router = _Ownership("hub-1"), _Router()
    cluster = Cluster(node="hub-1", ownership=ownership, router=router, make_dedup=_RecordingStore, clustered=True)
    running = await start(tmp_path, pki, cluster=cluster)
    try:
        service = running.service
        assert isinstance(service.dedup, _RecordingStore)
        await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
        a = await running.station("bs-a", A)
        await a.expect("attPrp")
        assert ownership.log == [("claim", A)] and ownership.owner("mioty", A) == "hub-1"
        await heard(running, a)
        assert _RecordingStore.seen == [((EP, 1), A)]
        # A status poll asked here runs where the station is, through the router.
        status = await service.poll_status(A)
        assert status["bsEui"] == A and ("mioty", A, "poll_status") in router.routed
        # Another hub took the station's newer connection: this one closes its own.
        ownership.lost[A]("hub-2")
        await a.lost
        await wait_for(lambda: A not in service.sessions)
        assert ownership.log[-1] == ("release", A) and ownership.owner("mioty", A) is None
        assert (await service.get_base_station(A) or {}).get("state") == "offline"
        # A revocation's close goes through the router too.
        b = await running.station("bs-a", A)
        await service.revoke_base_station(A, "stolen", actor="test")
        await b.lost
        assert ("mioty", A, "close") in router.routed
    finally:
        await running.stop()


def test_a_cluster_needs_postgresql_and_a_redis_url(tmp_path: Path) -> None:
    from bsscihub.config import ConfigError, load_config

    path = tmp_path / "hub.yaml"
    path.write_text("cluster:\n  redis: redis://:secret@127.0.0.1:6379/0\n  node: hub-1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert str(raised.value).startswith("config error: cluster.redis = ") and "PostgreSQL" in str(raised.value)
    assert "secret" not in str(raised.value)
    path.write_text("database: postgresql://hub@db/hub\ncluster:\n  redis: redis://127.0.0.1:6379/0\n  node: hub-1\n")
    config = load_config(path, {})
    assert config.section("cluster").redis == "redis://127.0.0.1:6379/0" and config.section("cluster").node == "hub-1"
    for key, value, reason in (("redis", "http://x", "expected redis://"), ("node", "a b", "letters, digits")):
        path.write_text(f"database: postgresql://hub@db/hub\ncluster:\n  {key}: {value!r}\n")
        with pytest.raises(ConfigError, match=reason):
            load_config(path, {})
    # A node name that changed with every start would orphan the hub's queued webhook events.
    path.write_text("database: postgresql://hub@db/hub\ncluster:\n  redis: redis://127.0.0.1:6379/0\n")
    with pytest.raises(ConfigError) as raised:
        require_node_name(load_config(path, {}))
    assert str(raised.value).startswith("config error: cluster.node = '': required with cluster.redis")
    require_node_name(load_config(path, {"BSSCIHUB_CLUSTER_NODE": "hub-2"}))
    # One hub by default: nothing to connect to.
    assert load_config(None, {}).section("cluster").redis == ""
