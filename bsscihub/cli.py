"""The `bsscihub` command: init, config check, users, and the subcommands the families contribute (ICommandLine).

Every subcommand takes --config and honours the BSSCIHUB_* environment overrides.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zope.interface.verify import verifyObject

from bsscihub import __version__
from bsscihub.config import ConfigError, HubConfig
from bsscihub.errors import DatabaseUnreachable, UserFacingError
from bsscihub.family import CLICommand, ICommandLine, IFamily, installed_families

if TYPE_CHECKING:
    from bsscihub.hub import Hub


class CLIError(UserFacingError):
    """A user mistake: printed as one line, exit status 1."""


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", default=argparse.SUPPRESS, help="YAML configuration file (default: etc/hub.yaml if present)"
    )
    return common


CORE_GROUPS = {"certs": "certificates"}
"""Command groups families add to (e.g. the mioty family's `certs issue-bs`)."""


def family_commands(families: Mapping[str, IFamily]) -> list[tuple[IFamily, CLICommand]]:
    """The subcommands the families contribute through ICommandLine, in family-name order."""
    found: list[tuple[IFamily, CLICommand]] = []
    for _, family in sorted(families.items()):
        if ICommandLine.providedBy(family):
            verifyObject(ICommandLine, family)
            found.extend((family, command) for command in family.cli_commands())
    return found


def build_parser(families: Mapping[str, IFamily] | None = None) -> argparse.ArgumentParser:
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

    groups: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    commands = family_commands(installed_families() if families is None else families)
    # Top-level commands first: a family may add to another's (`sim devices` next to mioty's `sim`).
    for family, command in sorted(commands, key=lambda found: len(found[1].path)):
        *group, name = command.path
        where = sub
        if group:
            if group[0] not in groups:
                if group[0] in leaves:
                    # Optional there: the command itself still runs without one (`bsscihub sim --sensors 5`).
                    groups[group[0]] = leaves[group[0]].add_subparsers(dest=f"{group[0]}_command", metavar="FAMILY")
                else:
                    groups[group[0]] = sub.add_parser(
                        group[0], parents=[common], help=CORE_GROUPS.get(group[0], f"{family.name} commands")
                    ).add_subparsers(dest=f"{group[0]}_command", required=True, metavar="COMMAND")
            where = groups[group[0]]
        parser_of = where.add_parser(name, parents=[common], help=command.help)
        command.add_arguments(parser_of, common)
        parser_of.set_defaults(family_command=(family.name, command))
        if not group:
            leaves[name] = parser_of
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
        except (UserFacingError, DatabaseUnreachable) as e:
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

    async def work(hub: Hub) -> int:
        from bsscihub import audit, users
        from bsscihub.logs import scrub

        # A container's entry point passes this on to its log: no database password in it.
        print(f"database {scrub(config.database)} ({hub.store.dialect}): schema up to date")
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

    async def work(hub: Hub) -> int:
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


async def _list_users(hub: Hub) -> int:
    from bsscihub import users
    from bsscihub.contract import rfc3339

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


COMMANDS: dict[str, Callable[[HubConfig, dict[str, Any], argparse.Namespace], int]] = {
    "init": cmd_init,
    "user": cmd_user,
    "config": cmd_config,
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
        if hasattr(args, "family_command"):
            family, command = args.family_command
            if command.needs_enabled and family not in families:
                raise CLIError(f"the {family} family is not enabled in `families`")
            return int(command.run(config, families, args))
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
    except DatabaseUnreachable as e:
        print(f"bsscihub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
