"""Client certificates from the web: issue one as a download, bound to what a family declares; list, revoke.

Issued and revoked serials are recorded in the core tables; a TLS listener consults `revoked_serials`.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import threads

from bsscihub import pki
from bsscihub.config import HubConfig
from bsscihub.contract import opt_time, rfc3339
from bsscihub.pki import Binding, BindingKind
from bsscihub.store import LIKE_ESCAPE, Cursor, Store, like_pattern, page
from bsscihub.web.errors import ApiError, bad_field, conflict
from bsscihub.web.routing import BoundRoute
from bsscihub.web.schema import string


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
    del out["bindings"]  # a CA is bound to nothing
    out["canIssue"] = Path(config.tls.ca_key).exists()
    return {_camel(k): v for k, v in out.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def kinds_json(kinds: Mapping[str, BindingKind]) -> list[dict[str, Any]]:
    """The binding kinds the families declare, as the certificates page offers them."""
    return [{"kind": k.name, "label": k.label, "subject": k.subject_label or None, "field": k.field}
            for k in kinds.values()]


def binding_of(kinds: Mapping[str, BindingKind], body: Mapping[str, Any]) -> Binding | None:
    """The binding an issue request asks for: `kind` (a kind's name, or an alias it had before bindings) and
    `subject`, or the `field` a kind declares (`{field: X}` is `{"kind": its name, "subject": X}`)."""
    named = body.get("kind")
    kind = None
    if named is not None:
        kind = next((k for k in kinds.values() if named == k.name or named in k.aliases), None)
        if kind is None:
            known = ", ".join(sorted(n for k in kinds.values() for n in (k.name, *k.aliases))) or "none"
            raise bad_field("kind", f"no family declares the binding kind {named!r} (known: {known})")
    subject, field = body.get("subject"), "subject"
    for other in kinds.values():
        value = body.get(other.field) if other.field else None
        if value is None:
            continue
        if kind is not None and kind is not other:
            raise conflict(f"{other.field} binds the certificate to {other.name}, not to {kind.name}; leave it out")
        if subject is not None and subject != value:
            raise conflict(f"subject and {other.field} differ; give one")
        kind, subject, field = other, value, other.field or field
    if kind is None:
        if subject is not None:
            raise bad_field("subject", "a subject needs the kind of binding it is (kind)")
        return None
    if not subject and kind.takes_subject and named in kind.aliases:
        return None  # as such a request was answered before bindings: a certificate bound to nothing
    try:
        return kind.bind(subject)
    except pki.PKIError as e:
        raise bad_field(field, str(e)) from None


def with_binding_fields(bound: BoundRoute, kinds: Mapping[str, BindingKind]) -> BoundRoute:
    """The route issuing certificates (POST .../certificates) also takes the `field` of every kind
    that declares one, in its schema and so in the OpenAPI document."""
    route = bound.route
    if route.kind != "api" or route.method != "POST" or not route.path.endswith("/certificates") or not route.body:
        return bound
    properties = dict(route.body["properties"])
    kind_names = sorted(n for k in kinds.values() for n in (k.name, *k.aliases))
    properties["kind"] = {**properties["kind"], "enum": kind_names} if kind_names else properties["kind"]
    for kind in kinds.values():
        if kind.field:
            properties[kind.field] = string(f"{kind.subject_label}: the same as kind {kind.name!r} with this subject",
                                            minLength=1, maxLength=128)
    return attrs.evolve(bound, route=attrs.evolve(route, body={**route.body, "properties": properties}))


@attrs.frozen
class IssuedBundle:
    serial: str
    name: str
    binding: Binding | None
    not_after: float
    filename: str
    content_type: str
    data: bytes


def _issue_files(config: HubConfig, name: str, binding: Binding | None, days: int, fmt: str) -> IssuedBundle:
    """Runs on a thread: RSA key generation takes tens of milliseconds."""
    workdir = Path(tempfile.mkdtemp(prefix="bsscihub-cert-"))
    try:
        issued = pki.issue_client_cert(config.tls.ca, config.tls.ca_key, name, workdir, days=days, binding=binding)
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
        format(issued.serial, "x"), name, issued.binding, issued.not_after.timestamp(), filename, ctype, data
    )


async def issue(
    config: HubConfig, store: Store, *, name: str, binding: Binding | None, days: int, fmt: str, actor: str,
    now: float,
) -> IssuedBundle:
    if not Path(config.tls.ca_key).exists():
        raise ApiError(409, "no_ca_key", "the hub has no CA key to sign with (tls.ca_key)")
    try:
        bundle = await threads.deferToThread(_issue_files, config, name, binding, days, fmt)
    except pki.PKIError as e:
        raise ApiError(400, "invalid", str(e)) from None
    await record_issued(store, bundle.serial, name, bundle.binding, bundle.not_after, now, actor)
    return bundle


async def record_issued(
    store: Store, serial: str, name: str, binding: Binding | None, not_after: float, now: float, actor: str
) -> None:
    """Note an issued certificate (serial in lower-case hex), so that it is listed and can be revoked."""
    await store.execute(
        "INSERT INTO issued_certs (serial, name, binding_kind, binding_subject, not_after, issued_at, actor)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (serial, name, binding.kind if binding else None, binding.subject if binding else "", not_after, now, actor),
    )


def _binding_json(kinds: Mapping[str, BindingKind], kind: str | None, subject: str) -> dict[str, Any]:
    """`binding` ({"kind", "subject"} or None) and every declared kind's `field` (its subject, or None)."""
    out: dict[str, Any] = {"binding": {"kind": kind, "subject": subject} if kind else None}
    for k in kinds.values():
        if k.field:
            out[k.field] = subject if kind == k.name else None
    return out


async def revoke(store: Store, serial: str, reason: str, actor: str, now: float,
                 kinds: Mapping[str, BindingKind]) -> dict[str, Any]:
    def run(c: Cursor) -> dict[str, Any]:
        if c.execute("SELECT 1 FROM revoked_certs WHERE serial = ?", (serial,)).fetchone():
            raise conflict(f"certificate {serial} is revoked already")
        c.execute(
            "INSERT INTO revoked_certs (serial, reason, revoked_at, actor) VALUES (?, ?, ?, ?)",
            (serial, reason, now, actor),
        )
        row = c.execute(
            "SELECT name, binding_kind, binding_subject FROM issued_certs WHERE serial = ?", (serial,)
        ).fetchone()
        return {
            "serial": serial,
            "reason": reason,
            "revokedAt": rfc3339(now),
            "name": row[0] if row else None,
            **_binding_json(kinds, row[1] if row else None, row[2] if row else ""),
        }

    return await store.interaction(run)


async def list_issued(store: Store, kinds: Mapping[str, BindingKind], *, q: str | None, limit: int,
                      offset: int) -> tuple[list[dict[str, Any]], int]:
    where, params = "1 = 1", []
    if q:
        where = f"(LOWER(i.name) LIKE ? {LIKE_ESCAPE} OR i.serial LIKE ? {LIKE_ESCAPE}" \
                f" OR LOWER(i.binding_subject) LIKE ? {LIKE_ESCAPE})"
        pattern = like_pattern(q.lower())
        params = [pattern, pattern, pattern]

    def run(c: Cursor) -> tuple[list[dict[str, Any]], int]:
        total, rows = page(
            c, "i.serial, i.name, i.binding_kind, i.binding_subject, i.not_after, i.issued_at, i.actor,"
            " r.revoked_at, r.reason", "issued_certs i LEFT JOIN revoked_certs r ON r.serial = i.serial", where,
            params, "i.issued_at DESC", limit, offset, counted="issued_certs i")
        items = [
            {
                "serial": r[0], "name": r[1], **_binding_json(kinds, r[2], r[3]),
                "notAfter": rfc3339(float(r[4])), "issuedAt": rfc3339(float(r[5])),
                "issuedBy": r[6], "revokedAt": opt_time(r[7]), "revokeReason": r[8],
            }
            for r in rows
        ]
        return items, total

    return await store.interaction(run)


async def list_revoked(store: Store, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    def run(c: Cursor) -> tuple[list[dict[str, Any]], int]:
        total, rows = page(c, "serial, reason, revoked_at, actor", "revoked_certs", "1 = 1", (), "revoked_at DESC",
                           limit, offset)
        items = [{"serial": r[0], "reason": r[1], "revokedAt": rfc3339(float(r[2])), "revokedBy": r[3]} for r in rows]
        return items, total

    return await store.interaction(run)


async def revoked_serials(store: Store) -> set[str]:
    """Every revoked serial (normalized hex): what a TLS listener's revocation check refuses."""
    return {row[0] for row in await store.fetchall("SELECT serial FROM revoked_certs")}
