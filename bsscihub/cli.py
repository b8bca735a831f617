"""The `bsscihub` command: init, certificates, users, sensors and the base-station simulator.

Every subcommand takes --config and honours the BSSCIHUB_* environment overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "init",
        parents=[common],
        help="create data_dir, the development CA and hub certificate, the schema and an admin user",
    )

    certs = sub.add_parser("certs", parents=[common], help="certificates").add_subparsers(
        dest="certs_command", required=True, metavar="COMMAND"
    )
    issue = certs.add_parser("issue-bs", parents=[common], help="issue a base-station client certificate")
    issue.add_argument("name", help="base-station name (certificate CN and SAN)")
    issue.add_argument("--out", required=True, help="directory for NAME.pem, NAME.key and ca.pem")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")

    users = sub.add_parser("user", parents=[common], help="hub users").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    add = users.add_parser("add", parents=[common], help="add a user; prints a generated password once")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["admin", "operator", "viewer"])

    sensors = sub.add_parser("sensors", parents=[common], help="mioty end points").add_subparsers(
        dest="sensors_command", required=True, metavar="COMMAND"
    )
    imp = sensors.add_parser("import", parents=[common], help="import end points from an endpoints.json file")
    imp.add_argument("file")
    exp = sensors.add_parser("export", parents=[common], help="print every end point as endpoints.json")
    exp.add_argument("--out", default="-", help="file to write (default: standard output)")

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

    path = getattr(args, "config", None)
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
    created = pki.issue_server_cert(tls.ca, tls.ca_key, tls.cert, tls.key)
    print(f"hub certificate {tls.cert}: {'created' if created else 'exists, kept'}")

    async def work(hub: Any) -> int:
        from bsscihub import audit, users

        print(f"database {config.database} ({hub.store.dialect}): schema up to date")
        if await users.user_exists(hub.store, "admin"):
            print("user admin: exists, kept")
            return 0
        password = users.generate_password()
        await users.add_user(hub.store, "admin", "admin", password)
        await audit.record(hub.store, "cli", "user.add", "admin", {"role": "admin"}, "bsscihub init")
        print(f"user admin created; its password (shown only now): {password}")
        return 0

    return run_with_store(config, families, work)


def cmd_certs(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    from bsscihub import pki

    if not Path(config.tls.ca).exists() or not Path(config.tls.ca_key).exists():
        raise CLIError(f"no CA at {config.tls.ca} / {config.tls.ca_key}: run `bsscihub init` first")
    issued = pki.issue_client_cert(config.tls.ca, config.tls.ca_key, args.name, args.out, days=args.days)
    print(f"issued {issued.cert_path} (key {issued.key_path}, CA {issued.ca_path}), serial {issued.serial:#x}")
    return 0


def cmd_user(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    async def work(hub: Any) -> int:
        from bsscihub import audit, users

        password = users.generate_password()
        try:
            await users.add_user(hub.store, args.name, args.role, password)
        except users.UserError as e:
            raise CLIError(str(e)) from None
        await audit.record(hub.store, "cli", "user.add", args.name, {"role": args.role}, "bsscihub user add")
        print(f"user {args.name} ({args.role}) created; its password (shown only now): {password}")
        return 0

    return run_with_store(config, families, work)


def cmd_sensors(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    if "mioty" not in families:
        raise CLIError("the mioty family is not enabled in `families`")
    from bsscihub.protocols.bssci import endpoints

    if args.sensors_command == "import":
        return run_with_store(config, families, lambda hub: endpoints.import_file(hub, args.file))
    return run_with_store(config, families, lambda hub: endpoints.export_file(hub, args.out))


def cmd_sim(config: HubConfig, families: dict[str, Any], args: argparse.Namespace) -> int:
    from bsscihub.sim import run

    return run(config, args)


COMMANDS: dict[str, Callable[[HubConfig, dict[str, Any], argparse.Namespace], int]] = {
    "init": cmd_init,
    "certs": cmd_certs,
    "user": cmd_user,
    "sensors": cmd_sensors,
    "sim": cmd_sim,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
