"""Base-station certificates from the web: issue one as a download, list what was issued, revoke by serial.

Issued and revoked serials are recorded in the core tables; a TLS listener consults `revoked_serials`.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import threads

from bsscihub import pki
from bsscihub.config import HubConfig
from bsscihub.contract import opt_time, rfc3339
from bsscihub.store import Cursor, Store
from bsscihub.web.errors import ApiError, bad_field, conflict


def normalize_serial(text: str) -> str:
    """'0x1A:2b' or '1a2b' -> '1a2b' (lower-case hex, no leading zeros): the form stored and shown."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 40 or not re.fullmatch(r"[0-9a-f]+", cleaned):
        raise bad_field("serial", "expected a certificate serial number in hex (at most 40 digits)")
    return format(int(cleaned, 16), "x")


def ca_info(config: HubConfig) -> dict[str, Any]:
    try:
        info = pki.describe_cert(config.tls.ca)
    except pki.PKIError as e:
        raise ApiError(503, "no_ca", f"the hub CA is not available: {e}") from None
    out = attrs.asdict(info)
    out["serial"] = normalize_serial(info.serial)
    out["canIssue"] = Path(config.tls.ca_key).exists()
    return {_camel(k): v for k, v in out.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@attrs.frozen
class IssuedBundle:
    serial: str
    name: str
    bs_eui: str | None
    not_after: float
    filename: str
    content_type: str
    data: bytes


def _issue_files(config: HubConfig, name: str, bs_eui: str | None, days: int, fmt: str,
                 application_center: bool = False) -> IssuedBundle:
    """Runs on a thread: RSA key generation takes tens of milliseconds."""
    workdir = Path(tempfile.mkdtemp(prefix="bsscihub-cert-"))
    try:
        issued = pki.issue_client_cert(config.tls.ca, config.tls.ca_key, name, workdir, days=days, bs_eui=bs_eui,
                                       application_center=application_center)
        cert, key, ca = (p.read_bytes() for p in (issued.cert_path, issued.key_path, issued.ca_path))
    finally:
        # The private key must not outlive the response on the hub's disk.
        shutil.rmtree(workdir, ignore_errors=True)
    if fmt == "pem":
        data, filename, ctype = cert + key + ca, f"{name}-bundle.pem", "application/x-pem-file"
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for member, content, mode in ((f"{name}.pem", cert, 0o644), (f"{name}.key", key, 0o600),
                                          ("ca.pem", ca, 0o644)):
                info = zipfile.ZipInfo(member)
                info.external_attr = (0o100000 | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, content)
        data, filename, ctype = buffer.getvalue(), f"{name}.zip", "application/zip"
    return IssuedBundle(
        format(issued.serial, "x"), name, issued.bs_eui, issued.not_after.timestamp(), filename, ctype, data
    )


async def issue(
    config: HubConfig, store: Store, *, name: str, bs_eui: str | None, days: int, fmt: str, actor: str, now: float,
    application_center: bool = False,
) -> IssuedBundle:
    if not Path(config.tls.ca_key).exists():
        raise ApiError(409, "no_ca_key", "the hub has no CA key to sign with (tls.ca_key)")
    try:
        bundle = await threads.deferToThread(_issue_files, config, name, bs_eui, days, fmt, application_center)
    except pki.PKIError as e:
        raise ApiError(400, "invalid", str(e)) from None
    await record_issued(store, bundle.serial, name, bundle.bs_eui, bundle.not_after, now, actor)
    return bundle


async def record_issued(
    store: Store, serial: str, name: str, bs_eui: str | None, not_after: float, now: float, actor: str
) -> None:
    """Note an issued certificate (serial in lower-case hex), so that it is listed and can be revoked."""
    await store.execute(
        "INSERT INTO issued_certs (serial, name, bs_eui, not_after, issued_at, actor) VALUES (?, ?, ?, ?, ?, ?)",
        (serial, name, bs_eui, not_after, now, actor),
    )


async def revoke(store: Store, serial: str, reason: str, actor: str, now: float) -> dict[str, Any]:
    def run(c: Cursor) -> dict[str, Any]:
        if c.execute("SELECT 1 FROM revoked_certs WHERE serial = ?", (serial,)).fetchone():
            raise conflict(f"certificate {serial} is revoked already")
        c.execute(
            "INSERT INTO revoked_certs (serial, reason, revoked_at, actor) VALUES (?, ?, ?, ?)",
            (serial, reason, now, actor),
        )
        row = c.execute("SELECT name, bs_eui FROM issued_certs WHERE serial = ?", (serial,)).fetchone()
        return {
            "serial": serial,
            "reason": reason,
            "revokedAt": rfc3339(now),
            "name": row[0] if row else None,
            "bsEui": row[1] if row else None,
        }

    return await store.interaction(run)


async def list_issued(store: Store, *, q: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    where, params = "1 = 1", []
    if q:
        where = "(LOWER(i.name) LIKE ? OR i.serial LIKE ? OR i.bs_eui LIKE ?)"
        pattern = "%" + q.lower().replace("%", "").replace("_", "") + "%"
        params = [pattern, pattern, pattern]

    def run(c: Cursor) -> tuple[list[dict[str, Any]], int]:
        total = c.execute(f"SELECT COUNT(*) FROM issued_certs i WHERE {where}", params).fetchone()
        rows = c.execute(
            "SELECT i.serial, i.name, i.bs_eui, i.not_after, i.issued_at, i.actor, r.revoked_at, r.reason"
            f" FROM issued_certs i LEFT JOIN revoked_certs r ON r.serial = i.serial WHERE {where}"
            " ORDER BY i.issued_at DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        items = [
            {
                "serial": r[0], "name": r[1], "bsEui": r[2],
                "notAfter": rfc3339(float(r[3])), "issuedAt": rfc3339(float(r[4])),
                "issuedBy": r[5], "revokedAt": opt_time(r[6]), "revokeReason": r[7],
            }
            for r in rows
        ]
        return items, int(total[0]) if total else 0

    return await store.interaction(run)


async def list_revoked(store: Store, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    def run(c: Cursor) -> tuple[list[dict[str, Any]], int]:
        total = c.execute("SELECT COUNT(*) FROM revoked_certs").fetchone()
        rows = c.execute(
            "SELECT serial, reason, revoked_at, actor FROM revoked_certs ORDER BY revoked_at DESC LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        items = [{"serial": r[0], "reason": r[1], "revokedAt": rfc3339(float(r[2])), "revokedBy": r[3]} for r in rows]
        return items, int(total[0]) if total else 0

    return await store.interaction(run)


async def revoked_serials(store: Store) -> set[str]:
    """Every revoked serial (normalized hex): what a TLS listener's revocation check refuses."""
    return {row[0] for row in await store.fetchall("SELECT serial FROM revoked_certs")}
