"""SCACI against the running hub (twistd): an application center with a certificate from `bsscihub certs issue-ac`
registers an end point over mutual TLS, receives its uplink from a base station and sends it a downlink."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bsscihub.protocols.bssci.scaci import MAGIC_AC
from tests.broker import Mosquitto, free_port
from tests.helpers import hub_cli, kill, start_hub, station_cert
from tests.test_mioty_crash import Station

EP = "0011223344556677"
A = "70b3d59cd00000a1"


class AppCenter(Station):
    """An application center on a blocking socket: MIOTYA01 frames over mutual TLS; it answers
    nothing by itself, the test does."""

    def __init__(self, port: int, cert: Path, key: Path, ca: Path) -> None:
        super().__init__(port, cert, key, ca, magic=MAGIC_AC)

    def answer(self, msg: dict[str, Any]) -> None:
        pass


def test_application_center_against_twistd(home: Path, log: Path,
                                           mosquitto_factory: Callable[..., Mosquitto]) -> None:
    certs = home / "certs"
    issued = hub_cli(home, "certs", "issue-ac", "ac-main", "--out", "ac")
    assert issued.returncode == 0, issued.stderr
    issued_bs = station_cert(home, "bs-a", A)
    broker = mosquitto_factory()
    web, bssci, scaci = free_port(), free_port(), free_port()
    hub = start_hub(home, log, web, bssci, broker, BSSCIHUB_SCACI_LISTEN=f"tcp:{scaci}:interface=127.0.0.1")
    station = ac = None
    try:
        ac = AppCenter(scaci, home / "ac" / "ac-main.pem", home / "ac" / "ac-main.key", certs / "ca.pem")
        ac.send("con", 0, version="1.0.0", acEui=0x70B3D5FFFE000001, snAcUuid=list(os.urandom(16)))
        assert ac.expect("conRsp", 0)["snResume"] is False
        ac.send("conCmp", 0)
        station = Station(bssci, issued_bs.cert_path, issued_bs.key_path, certs / "ca.pem")
        station.connect(A, "bs-a")
        op = ac.send("reg", epEui=int(EP, 16), nwkKey=list(range(16)), shAddr=0x1A2B, bidi=True)
        ac.expect("regRsp", op)
        assert station.expect("attPrp")["epEui"] == int(EP, 16)
        op = station.send("ulData", epEui=int(EP, 16), rxTime=time.time_ns(), packetCnt=9, snr=8.0, rssi=-99.0,
                          userData=[7, 7], dlOpen=True, responseExp=False, dlAck=False)
        station.expect("ulDataRsp", op)
        station.send("ulDataCmp", op)
        ul = ac.expect("ulData")
        assert (ul["epEui"], ul["packetCnt"], ul["userData"]) == (int(EP, 16), 9, [7, 7])
        assert [r["bsEui"] for r in ul["rxInfo"]] == [int(A, 16)]
        ac.send("ulDataRsp", ul["opId"])
        op = ac.send("dlDataQue", epEui=int(EP, 16), queId=5, userData=[[1, 2, 3]])
        que = station.expect("dlDataQue")  # the station accepts it (dlDataQueRsp), then the AC gets its answer
        ac.expect("dlDataQueRsp", op)
        assert que["userData"] == [[1, 2, 3]]
        res = station.send("dlDataRes", epEui=int(EP, 16), queId=que["queId"], result="sent", txTime=1, packetCnt=10)
        station.expect("dlDataResRsp", res)
        result = ac.expect("dlDataRes")
        assert (result["queId"], result["result"]) == (5, "sent")
    finally:
        for peer in (station, ac):
            if peer is not None:
                peer.sock.close()
        kill(hub)
    text = log.read_text()
    assert "SCACI listening on 127.0.0.1" in text and "application center 70b3d5fffe000001" in text
    assert "Traceback" not in text
