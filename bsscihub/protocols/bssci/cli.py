"""The mioty family's `bsscihub` subcommands: end points (sensors), wM-Bus meter keys, the
base-station simulator and base-station client certificates (`certs issue-bs`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from bsscihub.cli import CLIError, run_with_store
from bsscihub.config import HubConfig
from bsscihub.contract import eui64
from bsscihub.family import CLICommand, IFamily

if TYPE_CHECKING:
    from bsscihub.hub import Hub
    from bsscihub.pki import Binding, IssuedCert


def _sensors_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sensors = parser.add_subparsers(dest="sensors_command", required=True, metavar="COMMAND")
    imp = sensors.add_parser("import", parents=[common], help="import end points from endpoints.json or CSV")
    imp.add_argument("file")
    exp = sensors.add_parser("export", parents=[common], help="print every end point as endpoints.json or CSV")
    exp.add_argument("--out", default="-", help="file to write (default: standard output)")
    for sensors_parser in (imp, exp):
        sensors_parser.add_argument(
            "--format", choices=["auto", "json", "csv"], default="auto",
            help="endpoints.json or CSV (eui,nwKey,shortAddr,bidi); auto: csv for a .csv or .txt file, else json",
        )  # fmt: skip


def _sensors(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from bsscihub.protocols.bssci import endpoints

    if args.sensors_command == "import":
        return run_with_store(config, families, lambda hub: endpoints.import_file(hub, args.file, args.format))
    return run_with_store(config, families, lambda hub: endpoints.export_file(hub, args.out, args.format))


def _meters_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    meters_sub = parser.add_subparsers(dest="meters_command", required=True, metavar="COMMAND")
    key = meters_sub.add_parser("key", parents=[common],
                                help="set a meter's AES key, read from standard input (32 hex digits)")
    key.add_argument("meter", help="the meter: manufacturer code, dash, 8-digit ID, e.g. dme-81795246")
    key.add_argument("--clear", action="store_true", help="remove the key instead")
    key.add_argument("--name", help="also give the meter a name")
    meters_sub.add_parser("list", parents=[common], help="list the meters the hub knows")


def _meters(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from bsscihub import audit
    from bsscihub.errors import CommandError
    from bsscihub.protocols.bssci.meters import meter_key, parse_aes_key, registry_for

    async def work(hub: Hub) -> int:
        registry = registry_for(hub)
        if args.meters_command == "list":
            found, _ = await registry.find("", 100_000, 0)
            for meter in found:
                info = meter.to_json()
                print(f"{info['meter']}\t{info['medium'] or '?'}\tkey: {'set' if info['hasKey'] else 'none'}"
                      f"\tlast seen: {info['lastSeen'] or 'never'}\t{info['name'] or ''}")
            return 0
        text = ""
        if not args.clear:
            if sys.stdin.isatty():
                import getpass

                text = getpass.getpass("AES key of the meter (32 hex digits): ")
            else:
                text = sys.stdin.readline()
        try:
            ident = meter_key(args.meter)
            raw = None if args.clear else parse_aes_key(text.strip())
        except CommandError as e:
            raise CLIError(str(e)) from None
        await registry.set_key(ident, raw, time.time(), args.name)
        await audit.record(hub.store, "cli", "mioty.meter.key_clear" if args.clear else "mioty.meter.key_set", ident,
                           {}, "bsscihub meters key")
        print(f"meter {ident}: key {'removed' if args.clear else 'set'}")
        return 0

    return run_with_store(config, families, work)


def _sim_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    try:
        from bsscihub.protocols.bssci.sim import add_arguments
    except ImportError:  # as before the move: `sim --help` still answers without the simulator's imports
        return
    add_arguments(parser)


def _sim(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from bsscihub.protocols.bssci.sim import run

    return run(config, args)


def _issue_bs_arguments(issue: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    issue.add_argument("name", help="base-station name (certificate CN and SAN)")
    issue.add_argument("--out", required=True, help="directory for NAME.pem, NAME.key and ca.pem")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    issue.add_argument(
        "--eui", help="the station's bsEui (16 hex digits), bound into the certificate: it may be that station only"
    )


def _issue_bs(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from bsscihub.protocols.bssci.identity import STATION

    if args.eui is not None and STATION.normalize(args.eui) is None:
        raise CLIError(f"bad base-station EUI {args.eui!r}: expected 16 hex digits")
    issued = _issue(config, families, args, STATION.bind(args.eui) if args.eui is not None else None,
                    "bsscihub certs issue-bs")
    bound = f"bound to base station {issued.binding.subject}" if issued.binding else "bound to no EUI"
    print(f"issued {issued.cert_path} (key {issued.key_path}, CA {issued.ca_path}), serial {issued.serial:#x}, {bound}")
    if issued.binding is None:
        print("note: a certificate bound to no EUI connects only as a station already registered with it,"
              " or with bssci.self_register: true; pass --eui to bind it", file=sys.stderr)
    return 0


def _issue_ac_arguments(issue: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    issue.add_argument("name", help="application-center name (certificate CN and SAN)")
    issue.add_argument("--out", required=True, help="directory for NAME.pem, NAME.key and ca.pem")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")


def _issue_ac(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from bsscihub.protocols.bssci.identity import APPLICATION_CENTER

    issued = _issue(config, families, args, APPLICATION_CENTER.bind(), "bsscihub certs issue-ac")
    print(f"issued {issued.cert_path} (key {issued.key_path}, CA {issued.ca_path}), serial {issued.serial:#x},"
          " for a mioty application center (SCACI)")
    return 0


def _issue(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace, binding: Binding | None,
           source: str) -> IssuedCert:
    """Issue a client certificate as the web does: listed there, revocable by serial, audited."""
    from pathlib import Path

    from bsscihub import pki

    if not Path(config.tls.ca).exists() or not Path(config.tls.ca_key).exists():
        raise CLIError(f"no CA at {config.tls.ca} / {config.tls.ca_key}: run `bsscihub init` first")
    issued = pki.issue_client_cert(config.tls.ca, config.tls.ca_key, args.name, args.out, days=args.days,
                                   binding=binding)

    async def work(hub: Hub) -> int:
        from bsscihub import audit
        from bsscihub.web.certs import record_issued

        serial = format(issued.serial, "x")
        await record_issued(hub.store, serial, args.name, binding, issued.not_after.timestamp(), time.time(), "cli")
        await audit.record(hub.store, "cli", "cert.issue", serial,
                           {"name": args.name, "binding": binding.to_json() if binding else None}, source)
        return 0

    run_with_store(config, families, work)
    return issued


def _blueprints_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="blueprints_command", required=True, metavar="COMMAND")
    imp = sub.add_parser("import", parents=[common], help="import blueprint JSON files (replacing by type)")
    imp.add_argument("files", nargs="+", metavar="FILE")
    sub.add_parser("list", parents=[common], help="list the imported blueprints")
    assign = sub.add_parser("assign", parents=[common], help="give a sensor a Type EUI (none: take it away)")
    assign.add_argument("sensor", help="the sensor's EUI-64")
    assign.add_argument("type_eui", metavar="TYPE", help="16 hex digits, or none")


def _blueprints(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    from pathlib import Path

    from bsscihub import audit
    from bsscihub.protocols.bssci.blueprints import BlueprintBook, BlueprintError

    async def work(hub: Hub) -> int:
        book = BlueprintBook(hub.store, hub.reactor)
        await book.load()
        if args.blueprints_command == "list":
            for b in book.list():
                print(f"{b['typeEui']}\t{b['name'] or ''}\t{b['vendor'] or ''}\tformats: "
                      f"{','.join(map(str, b['formats']))}\tsensors: {b['sensors']}")
            return 0
        if args.blueprints_command == "assign":
            eui = eui64(args.sensor)
            if eui is None:
                raise CLIError(f"sensor {args.sensor!r}: an EUI-64 is 16 hex digits")
            t = None if args.type_eui.lower() == "none" else args.type_eui
            try:
                await book.set_type(eui, t)
            except BlueprintError as e:
                raise CLIError(f"{args.type_eui!r}: {e}") from None
            await audit.record(hub.store, "cli", "mioty.sensor.type", eui, {"typeEui": book.types.get(eui)},
                               "bsscihub blueprints assign")
            print(f"sensor {eui}: type {book.types.get(eui) or 'none'}")
            return 0
        for name in args.files:
            try:
                text = Path(name).read_bytes()
            except OSError as e:
                raise CLIError(f"{name}: {e.strerror}") from None
            try:
                bp = await book.add(text, "cli")
            except BlueprintError as e:
                raise CLIError(f"{name}: {e}") from None
            await audit.record(hub.store, "cli", "mioty.blueprint.import", bp.type_eui, {"name": bp.name},
                               "bsscihub blueprints import")
            print(f"{name}: blueprint {bp.type_eui} ({bp.name or 'no name'}), formats "
                  f"{', '.join(map(str, sorted(bp.formats)))}")
        return 0

    return run_with_store(config, families, work)


COMMANDS = (
    CLICommand(("certs", "issue-bs"), "issue a base-station client certificate", _issue_bs_arguments, _issue_bs,
               needs_enabled=False),
    CLICommand(("certs", "issue-ac"), "issue a mioty application-center (SCACI) client certificate",
               _issue_ac_arguments, _issue_ac, needs_enabled=False),
    CLICommand(("sensors",), "mioty end points", _sensors_arguments, _sensors),
    CLICommand(("meters",), "wireless M-Bus meters (mioty Variable MAC)", _meters_arguments, _meters),
    CLICommand(("blueprints",), "mioty Blueprints (decoding sensor payloads)", _blueprints_arguments, _blueprints),
    CLICommand(("sim",), "simulate mioty base stations against a hub", _sim_arguments, _sim, needs_enabled=False),
)
