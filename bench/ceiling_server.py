"""The ceiling for the BSSCI benchmark: a bare Twisted mutual-TLS server that frames and answers.
It answers only `conRsp` and `ulDataRsp` and ignores everything else; the hub is measured against it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from bsscihub.protocols.bssci.framing import Framer, FramingError, encode_frame
from bsscihub.protocols.bssci.messages import ConRsp, encode
from bsscihub.tls import MutualTLSEndpoint, server_context_factory

__all__ = ["CeilingFactory", "CeilingStats", "listen", "main"]

SC_EUI = 0x70B3D59CD0000000


@attrs.define
class CeilingStats:
    """What the ceiling served since it started."""

    connections: int = 0
    ul_data: int = 0


class CeilingProtocol(Protocol):
    """One base-station connection: frames in, `conRsp`/`ulDataRsp` out, nothing else."""

    factory: CeilingFactory

    def connectionMade(self) -> None:
        self._framer = Framer()
        self.factory.stats.connections += 1

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        try:
            messages = self._framer.feed(data)
        except FramingError:
            transport.loseConnection()
            return
        write = transport.write
        for message in messages:
            command = message.get("command")
            # BufferingTLSTransport (from MutualTLSEndpoint) gathers these
            # writes into one TLS write per read, as it does for the hub.
            if command == "ulData":
                self.factory.stats.ul_data += 1
                write(encode_frame({"command": "ulDataRsp", "opId": message["opId"]}))
            elif command == "con":
                write(self.factory.con_rsp(message))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.stats.connections -= 1


class CeilingFactory(Factory):
    protocol = CeilingProtocol  # type: ignore[assignment]

    def __init__(self) -> None:
        self.stats = CeilingStats()

    def con_rsp(self, con: dict[str, Any]) -> bytes:
        version = con.get("version")
        rsp = ConRsp(
            opId=0,
            version=version if isinstance(version, str) else None,
            scEui=SC_EUI,
            snResume=False,
            snScUuid=os.urandom(16),
        )
        return encode_frame(encode(rsp))


def listen(
    reactor: Any,
    endpoint: str,
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
) -> tuple[CeilingFactory, Deferred[IListeningPort]]:
    """Listen on `endpoint` with the hub's own mutual-TLS policy (same certificates, same checks)."""
    factory = CeilingFactory()
    policy = server_context_factory(ca, cert, key)
    tls = MutualTLSEndpoint(serverFromString(reactor, endpoint), policy, clock=reactor)
    return factory, tls.listen(factory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bare BSSCI ceiling server: mutual TLS, framing, conRsp and ulDataRsp only."
    )
    parser.add_argument(
        "--listen",
        default="tcp:16017:interface=127.0.0.1",
        help="Twisted endpoint (default tcp:16017:interface=127.0.0.1; tcp:0 picks a free port)",
    )
    parser.add_argument("--ca", default="certs/ca.pem", help="CA that signed the base-station certificates")
    parser.add_argument("--cert", default="certs/hub.pem", help="server certificate")
    parser.add_argument("--key", default="certs/hub.key", help="server key")
    parser.add_argument("--port-file", help="write the bound port number here once listening")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    factory, listening = listen(reactor, args.listen, args.ca, args.cert, args.key)

    def bound(port: IListeningPort) -> None:
        number = port.getHost().port  # type: ignore[attr-defined]
        if args.port_file:
            tmp = Path(f"{args.port_file}.tmp")
            tmp.write_text(f"{number}\n")
            tmp.replace(args.port_file)
        print(f"ceiling listening on port {number}", flush=True)

    def failed(failure: Failure) -> None:
        print(f"ceiling cannot listen: {failure.getErrorMessage()}", file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    listening.addCallbacks(bound, failed)
    # SIGTERM from the benchmark: stop cleanly so the count below is printed.
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    print(f"ceiling answered {factory.stats.ul_data} ulData", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
