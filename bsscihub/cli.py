"""The `bsscihub` command: init, config check, certificates, users, sensors, meters and the base-station simulator.

Every subcommand takes --config and honours the BSSCIHUB_* environment overrides.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bsscihub import __version__
from bsscihub.config import ConfigError, HubConfig
from bsscihub.errors import UserFacingError


class CLIError(UserFacingError):
    """A user mistake: printed as one line, exit status 1."""


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", default=argparse.SUPPRESS, help="YAML configuration file (default: etc/hub.yaml if present)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="bsscihub", description="bsscihub IoT hub administration", parents=[common])
    parser.add_argument("--version", action="version", version=f"bsscihub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        parents=[common],
        help="create the configuration file (from the sample, if missing), data_dir, the development CA"
        " and hub certificate, the schema and an admin user",
    )
    init.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address base stations reach the hub by, for a new hub certificate"
        " (repeatable; default: localhost and 127.0.0.1)",
    )
    init.add_argument(
        "--password-file",
        metavar="FILE",
        help="write the new admin's password to FILE (mode 0600) instead of printing it",
    )

    certs = sub.add_parser("certs", parents=[common], help="certificates").add_subparsers(
        dest="certs_command", required=True, metavar="COMMAND"
    )
    issue = certs.add_parser("issue-bs", parents=[common], help="issue a base-station client certificate")
    issue.add_argument("name", help="base-station name (certificate CN and SAN)")
    issue.add_argument("--out", required=True, help="directory for NAME.pem, NAME.key and ca.pem")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    issue.add_argument(
        "--eui", help="the station's bsEui (16 hex digits), bound into the certificate: it may be that station only"
    )

    users = sub.add_parser("user", parents=[common], help="hub users").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    add = users.add_parser("add", parents=[common], help="add a user; prints a generated password once")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["admin", "operator", "viewer"])
    users.add_parser("list", parents=[common], help="list users with their role and state")
    passwd = users.add_parser(
        "passwd",
        parents=[common],
        help="set a user's password (asked twice on a terminal, else the first line of standard input)",
        description="Set a user's password; the user's bearer tokens are revoked and open sessions end.",
    )
    passwd.add_argument("name")
    passwd.add_argument("--generate", action="store_true", help="generate one and print it once")
    for verb, text in (("disable", "refuse every log-in, session, token and API key of a user"),
                       ("enable", "let a disabled user log in again")):
        users.add_parser(verb, parents=[common], help=text, description=text).add_argument("name")
    role = users.add_parser("role", parents=[common], help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=["admin", "operator", "viewer"])

    config = sub.add_parser("config", parents=[common], help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    check = config.add_parser(
        "check",
        parents=[common],
        help="validate a configuration file and print the effective configuration, secrets masked",
        description="Validate FILE (or --config) with the BSSCIHUB_* overrides applied; exit status 2 if it is bad.",
    )
    check.add_argument("config_file", nargs="?", metavar="FILE", help="the file to check (default: --config)")
    config.add_parser("sample", parents=[common], help="print the documented sample configuration")

    sensors = sub.add_parser("sensors", parents=[common], help="mioty end points").add_subparsers(
        dest="sensors_command", required=True, metavar="COMMAND"
    )
    imp = sensors.add_parser("import", parents=[common], help="import end points from endpoints.json or CSV")
    imp.add_argument("file")
    exp = sensors.add_parser("export", parents=[common], help="print every end point as endpoints.json or CSV")
    exp.add_argument("--out", default="-", help="file to write (default: standard output)")
    for sensors_parser in (imp, exp):
        sensors_parser.add_argument(
            "--format", choices=["auto", "json", "csv"], default="auto",
            help="endpoints.json or CSV (eui,nwKey,shortAddr,bidi); auto: csv for a .csv or .txt file, else json",
        )  # fmt: skip

    meters = sub.add_parser("meters", parents=[common], help="wireless M-Bus meters (mioty Variable MAC)")
    meters_sub = meters.add_subparsers(dest="meters_command", required=True, metavar="COMMAND")
    key = meters_sub.add_parser("key", parents=[common],
                                help="set a meter's AES key, read from standard input (32 hex digits)")
    key.add_argument("meter", help="the meter: manufacturer code, dash, 8-digit ID, e.g. dme-81795246")
    key.add_argument("--clear", action="store_true", help="remove the key instead")
    key.add_argument("--name", help="also give the meter a name")
    meters_sub.add_parser("list", parents=[common], help="list the meters the hub knows")

    sim = sub.add_parser("sim", parents=[common], help="simulate mioty base stations against a hub")
    try:
        from bsscihub.sim import add_arguments
    except ImportError:
        pass
    else:
        add_arguments(sim)
    return parser


def load(args: argparse.Namespace) -> tuple[HubConfig, dict[str, Any]]:
    from bsscihub.tap import load_hub_config

    path = getattr(args, "config_file", None) or getattr(args, "config", None)
    if path is None and Path("etc/hub.yaml").exists():
        path = "etc/hub.yaml"
    return load_hub_config(path)


def run_with_store(config: HubConfig, families: dict[str, Any], work: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Run `work(hub)` on a reactor with the store started and migrated."""
    from twisted.internet import defer, task

    from bsscihub.hub import make_hub

    outcome: list[Any] = []

    async def main(reactor: Any) -> None:
        hub = make_hub(config, reactor, families)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        hub.store.start()
        try:
            await hub.store.migrate(hub.migrations())
            outcome.append(await work(hub))
        except UserFacingError as e:
            outcome.append(e)  # re-raised below, outside the reactor, as one line
        finally:
            await hub.store.stop()

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    if not outcome:
        return 1
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return int(outcome[0])


def cmd_init(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    from bsscihub import pki

    tls = config.tls
    created = pki.create_ca(tls.ca, tls.ca_key)
    print(f"CA certificate {tls.ca}: {'created' if created else 'exists, kept'}")
    if args.hostname:
        hostnames, ips = _hostnames(args.hostname)
        created = pki.issue_server_cert(tls.ca, tls.ca_key, tls.cert, tls.key, hostnames=hostnames, ips=ips)
    else:
        created = pki.issue_server_cert(tls.ca, tls.ca_key, tls.cert, tls.key)
    print(f"hub certificate {tls.cert}: {'created' if created else 'exists, kept'}")

    async def work(hub: Any) -> int:
        from bsscihub import audit, users

        print(f"database {config.database} ({hub.store.dialect}): schema up to date")
        if await users.user_exists(hub.store, "admin"):
            print("user admin: exists, kept")
            return 0
        password = users.generate_password()
        if args.password_file:
            _write_secret(Path(args.password_file), password + "\n")
        await users.add_user(hub.store, "admin", "admin", password)
        await audit.record(hub.store, "cli", "user.add", "admin", {"role": "admin"}, "bsscihub init")
        if args.password_file:
            print(f"user admin created; its password is in {args.password_file} (readable only by its owner)")
        else:
            print(f"user admin created; its password (shown only now): {password}")
        return 0

    return run_with_store(config, families, work)


def _hostnames(given: Sequence[str]) -> tuple[list[str], list[str]]:
    """--hostname values split into DNS names and IP addresses for the hub certificate."""
    import ipaddress

    hostnames, ips = [], []
    for name in given:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            hostnames.append(name)
    return hostnames, ips


def _write_secret(path: Path, text: str) -> None:
    import os

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # also when the file was there with a wider mode
            f.write(text)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror}") from None


def cmd_certs(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    from bsscihub import pki

    if not Path(config.tls.ca).exists() or not Path(config.tls.ca_key).exists():
        raise CLIError(f"no CA at {config.tls.ca} / {config.tls.ca_key}: run `bsscihub init` first")
    issued = pki.issue_client_cert(
        config.tls.ca, config.tls.ca_key, args.name, args.out, days=args.days, bs_eui=args.eui
    )

    async def work(hub: Any) -> int:
        import time

        from bsscihub import audit
        from bsscihub.web.certs import record_issued

        # like a certificate issued from the web: listed there, revocable by serial, audited
        serial = format(issued.serial, "x")
        await record_issued(hub.store, serial, args.name, issued.bs_eui, issued.not_after.timestamp(), time.time(),
                            "cli")
        await audit.record(hub.store, "cli", "cert.issue", serial, {"name": args.name, "bsEui": issued.bs_eui},
                           "bsscihub certs issue-bs")
        return 0

    run_with_store(config, families, work)
    bound = f"bound to base station {issued.bs_eui}" if issued.bs_eui else "bound to no EUI"
    print(f"issued {issued.cert_path} (key {issued.key_path}, CA {issued.ca_path}), serial {issued.serial:#x}, {bound}")
    if issued.bs_eui is None:
        print("note: a certificate bound to no EUI connects only as a station already registered with it,"
              " or with bssci.self_register: true; pass --eui to bind it", file=sys.stderr)
    return 0


def _new_password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated) for `user passwd`."""
    from bsscihub import users

    if args.generate:
        return users.generate_password(), True
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass(f"new password for {args.name}: ")
        if getpass.getpass("again: ") != first:
            raise CLIError("the two passwords differ; nothing changed")
        return first, False
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CLIError("no password on standard input (or use --generate); nothing changed")
    return line, False


def cmd_user(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    command = args.user_command
    password, generated = _new_password(args) if command == "passwd" else ("", False)

    async def work(hub: Any) -> int:
        from bsscihub import audit, users

        if command == "list":
            return await _list_users(hub)
        if command == "add":
            initial = users.generate_password()
            try:
                await users.add_user(hub.store, args.name, args.role, initial)
            except users.UserError as e:
                raise CLIError(str(e)) from None
            await audit.record(hub.store, "cli", "user.add", args.name, {"role": args.role}, "bsscihub user add")
            print(f"user {args.name} ({args.role}) created; its password (shown only now): {initial}")
            return 0
        changes: dict[str, dict[str, Any]] = {
            "passwd": {"password": password},
            "disable": {"disabled": True},
            "enable": {"disabled": False},
            "role": {"role": getattr(args, "role", None)},
        }
        change = changes[command]
        try:
            user = await users.update_user(hub.store, args.name, **change)
        except users.UserError as e:
            raise CLIError(str(e)) from None
        if user is None:
            raise CLIError(f"no user {args.name!r}")
        revoked = 0
        if command in ("passwd", "disable"):
            from bsscihub.web.auth import revoke_user_tokens

            # As the REST API does: a new password or a disabled account ends what was issued before.
            # A running hub drops the sessions whose rows are gone at its next housekeeping round.
            revoked = await revoke_user_tokens(hub.store, user.id, time.time())
            await hub.store.execute("DELETE FROM web_sessions WHERE user_id = ?", (user.id,))
        detail = {k: (v if k != "password" else "changed") for k, v in change.items()}
        await audit.record(hub.store, "cli", "user.update", user.name, detail, f"bsscihub user {command}")
        if command == "passwd":
            shown = f"; its password (shown only now): {password}" if generated else ""
            print(f"password of {user.name} changed, {revoked} bearer token(s) revoked{shown}")
        elif command == "role":
            print(f"user {user.name} is now {user.role}")
        else:
            state = "disabled" if user.disabled else "enabled"
            print(f"user {user.name} {state}" + (f", {revoked} bearer token(s) revoked" if revoked else ""))
        return 0

    return run_with_store(config, families, work)


async def _list_users(hub: Any) -> int:
    from bsscihub import users
    from bsscihub.mqtt.bridge import rfc3339

    rows: list[users.User] = []
    while True:
        page, total = await users.list_users(hub.store, limit=500, offset=len(rows))
        rows.extend(page)
        if not page or len(rows) >= total:
            break
    table = [("NAME", "ROLE", "STATE", "CREATED")] + [
        (u.name, u.role, "disabled" if u.disabled else "enabled", rfc3339(u.created_at)) for u in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return 0


def cmd_config(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    import yaml

    source = getattr(args, "config_file", None) or getattr(args, "config", None)
    if source is None:
        source = "etc/hub.yaml" if Path("etc/hub.yaml").exists() else "(defaults)"
    print(f"# {source}: valid. The effective configuration, BSSCIHUB_* overrides applied, secrets masked:")
    effective = config.masked() | {"families": list(families)}  # the enabled ones, also when unset
    print(yaml.safe_dump(effective, sort_keys=False, default_flow_style=False, allow_unicode=True), end="")
    return 0


def cmd_sensors(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    if "mioty" not in families:
        raise CLIError("the mioty family is not enabled in `families`")
    from bsscihub.protocols.bssci import endpoints

    if args.sensors_command == "import":
        return run_with_store(config, families, lambda hub: endpoints.import_file(hub, args.file, args.format))
    return run_with_store(config, families, lambda hub: endpoints.export_file(hub, args.out, args.format))


def cmd_meters(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    if "mioty" not in families:
        raise CLIError("the mioty family is not enabled in `families`")
    import time

    from bsscihub import audit
    from bsscihub.errors import CommandError
    from bsscihub.protocols.bssci.meters import meter_key, parse_aes_key, registry_for

    async def work(hub: Any) -> int:
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


def cmd_sim(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    from bsscihub.sim import run

    return run(config, args)


COMMANDS: dict[str, Callable[[HubConfig, dict[str, Any], argparse.Namespace], int]] = {
    "init": cmd_init,
    "certs": cmd_certs,
    "user": cmd_user,
    "sensors": cmd_sensors,
    "config": cmd_config,
    "sim": cmd_sim,
    "meters": cmd_meters,
}


def sample_config() -> str:
    """The documented sample configuration shipped in the package (the repository's etc/hub.yaml)."""
    from importlib.resources import files

    return files("bsscihub").joinpath("hub.yaml").read_text(encoding="utf-8")


def write_sample_config(args: argparse.Namespace) -> None:
    """`init`: write the sample configuration where --config points (default etc/hub.yaml) if nothing is there."""
    path = Path(getattr(args, "config", None) or "etc/hub.yaml")
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:  # "x": never overwrite one made meanwhile
            f.write(sample_config())
    except OSError as e:
        raise CLIError(f"cannot write the configuration {path}: {e.strerror}") from None
    args.config = str(path)
    print(f"configuration {path}: created from the documented sample")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "sample":
        print(sample_config(), end="")
        return 0
    try:
        if args.command == "init":
            write_sample_config(args)
        config, families = load(args)
        return COMMANDS[args.command](config, families, args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"bsscihub: {e}", file=sys.stderr)
        return 1
    except UserFacingError as e:
        print(f"bsscihub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
