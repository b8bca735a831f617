"""The development PKI: a hub CA, the hub's server certificate and client certificates,
made with `cryptography` and written with safe file modes; a client certificate may be bound to a family's subject."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from bsscihub.errors import UserFacingError

__all__ = [
    "Binding",
    "BindingKind",
    "CertInfo",
    "IssuedCert",
    "PKIError",
    "cert_bindings",
    "cert_common_name",
    "create_ca",
    "describe_cert",
    "issue_client_cert",
    "issue_server_cert",
]

StrPath = str | os.PathLike[str]

log = Logger()

# RSA 2048 rather than EC P-256: the CA and client keys end up inside base
# station firmware, and some embedded TLS stacks in the field are built
# without ECDSA; RSA 2048 with SHA-256 is the one combination all of them load.
_RSA_BITS = 2048
# Base stations without a real-time clock may run a little behind after boot.
_BACKDATE = datetime.timedelta(hours=1)
# CN has an upper bound of 64 characters (RFC 5280, ub-common-name).
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# A binding of a kind that names no URI of its own: urn:bsscihub:binding:{kind}:{subject}.
BINDING_URI = "urn:bsscihub:binding:"
_KIND = re.compile(r"[a-z][a-z0-9-]*(\.[a-z0-9-]+)+")
_SUBJECT = re.compile(r"[A-Za-z0-9._~:-]{1,128}")
# A CA made elsewhere (an operator's own) may use any key type that can sign.
_ISSUER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class PKIError(UserFacingError):
    """A certificate or key could not be created, read or used."""


@attrs.frozen
class Binding:
    """What a client certificate is bound to: a kind a family declares and its subject
    (e.g. ("bssci.station", an EUI-64)); "" for a kind that takes none."""

    kind: str
    subject: str = ""
    uri: str | None = attrs.field(default=None, eq=False, repr=False)
    """How the certificate writes it (BindingKind.bind sets it); None: urn:bsscihub:binding:{kind}:{subject}."""

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject}


def _any_subject(text: str) -> str | None:
    return text if _SUBJECT.fullmatch(text) else None


@attrs.frozen
class BindingKind:
    """A kind of binding a family declares (bsscihub.family.ICertificateBindings)."""

    name: str
    """Dotted, the family's prefix first ("bssci.station"): stored, listed and audited as is."""
    label: str
    """What the admin chooses ("a base station (BSSCI)")."""
    subject_label: str = ""
    """What the subject is ("EUI-64, 16 hex digits"); "" when the kind takes no subject."""
    normalize: Callable[[str], str | None] = _any_subject
    """The subject's one written form, or None when it is not one."""
    uri: str | None = None
    """The SAN URI the binding is written as (the subject appended); None: urn:bsscihub:binding:{name}:.
    A kind keeps the URI certificates were issued with before it was a binding, so those stay readable."""
    field: str | None = None
    """A REST request and listing field that carries this kind's subject by itself (kept from before bindings)."""
    aliases: tuple[str, ...] = ()
    """Other values the REST request's `kind` took for this kind before bindings; without a subject, such a
    request issues a certificate bound to nothing, as it did."""

    def __attrs_post_init__(self) -> None:
        if not _KIND.fullmatch(self.name):
            raise ValueError(f"bad binding kind {self.name!r}: dotted lower-case words, the family's first")

    @property
    def takes_subject(self) -> bool:
        return bool(self.subject_label)

    def bind(self, subject: str | None = None) -> Binding:
        """This kind's binding to `subject` (normalized); PKIError naming the kind when it is not one."""
        if not self.takes_subject:
            if subject:
                raise PKIError(f"a certificate bound to {self.name} takes no subject")
            return Binding(self.name, "", self._prefix)
        cleaned = self.normalize(subject.strip()) if subject else None
        if cleaned is None:
            raise PKIError(f"bad {self.name} subject {subject!r}: expected {self.subject_label}")
        return Binding(self.name, cleaned, self._prefix + cleaned)

    @property
    def _prefix(self) -> str:
        return self.uri if self.uri is not None else f"{BINDING_URI}{self.name}:"

    def read(self, uri: str) -> Binding | None:
        """The binding `uri` writes, if it is one of this kind."""
        prefix = self._prefix
        if not uri.lower().startswith(prefix.lower()):
            return None
        if not self.takes_subject:
            return Binding(self.name, "", uri) if len(uri) == len(prefix) else None
        subject = self.normalize(uri[len(prefix):])
        return Binding(self.name, subject, uri) if subject is not None else None


def check_kinds(kinds: Iterable[BindingKind]) -> dict[str, BindingKind]:
    """The kinds by name; ValueError when two share a name or alias, a field or a URI."""
    found: dict[str, BindingKind] = {}
    owners: dict[tuple[str, str], str] = {}
    for kind in kinds:
        keys = [("name", n) for n in (kind.name, *kind.aliases)]
        keys += [("field", kind.field)] if kind.field else []
        keys += [("URI", kind.uri.lower())] if kind.uri else []
        for key in keys:
            if key in owners:
                raise ValueError(f"binding kinds {owners[key]} and {kind.name} share the {key[0]} {key[1]!r}")
            owners[key] = kind.name
        found[kind.name] = kind
    return found


@attrs.frozen
class IssuedCert:
    """Where a freshly issued client certificate was written."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    serial: int
    not_after: datetime.datetime
    binding: Binding | None = None


@attrs.frozen
class CertInfo:
    """What the admin UI and API show about one certificate."""

    subject: str
    issuer: str
    common_name: str | None
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint_sha256: str
    is_ca: bool
    bindings: tuple[Binding, ...]


def create_ca(
    cert_path: StrPath,
    key_path: StrPath,
    *,
    common_name: str = "bsscihub development CA",
    days: int = 3650,
) -> bool:
    """Create a self-signed CA unless both files exist; True if created."""
    cert_file, key_file = Path(cert_path), Path(key_path)
    if not _needs_creating(cert_file, key_file):
        return False
    _check_days(days)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # pathlen 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_file, cert, key_file, key, replace=False)
    log.info(
        "created CA {subject} in {cert_path}",
        subject=cert.subject.rfc4514_string(),
        cert_path=str(cert_file),
    )
    return True


def issue_server_cert(
    ca_cert_path: StrPath,
    ca_key_path: StrPath,
    cert_path: StrPath,
    key_path: StrPath,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    days: int = 825,
) -> bool:
    """Issue the hub's server certificate unless both files exist; True if issued."""
    cert_file, key_file = Path(cert_path), Path(key_path)
    if not _needs_creating(cert_file, key_file):
        return False
    _check_days(days)
    names: list[x509.GeneralName] = [
        x509.DNSName(_check_hostname(h)) for h in hostnames
    ]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PKIError(f"not an IP address: {ip!r}") from None
    if not names:
        raise PKIError("a server certificate needs at least one hostname or IP address")
    ca_cert, ca_key = _load_ca(Path(ca_cert_path), Path(ca_key_path))
    key = _new_key()
    common_name = hostnames[0] if hostnames else ips[0]
    cert = _leaf_builder(ca_cert, ca_key, key, common_name, days, names).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
    )
    # keyEncipherment: TLS 1.2 RSA key exchange, still the only one some
    # firmwares offer.
    cert = cert.add_extension(
        _key_usage(digital_signature=True, key_encipherment=True), critical=True
    )
    signed = cert.sign(ca_key, hashes.SHA256())
    _write_pair(cert_file, signed, key_file, key, replace=False)
    log.info(
        "issued server certificate {subject} in {cert_path}",
        subject=signed.subject.rfc4514_string(),
        cert_path=str(cert_file),
    )
    return True


def issue_client_cert(
    ca_cert_path: StrPath,
    ca_key_path: StrPath,
    name: str,
    out_dir: StrPath,
    *,
    days: int = 825,
    binding: Binding | None = None,
    overwrite: bool = False,
) -> IssuedCert:
    """Issue a client certificate into out_dir as NAME.pem, NAME.key and ca.pem (the CA
    certificate the device must trust), bound to `binding` (made by BindingKind.bind) if given."""
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise PKIError(
            f"bad certificate name {name!r}: use 1 to 64 letters, digits,"
            " '-', '.' or '_', not starting with '.' or '-'"
        )
    # NAME.pem must not collide with the copy of the CA certificate.
    if name.lower() == "ca":
        raise PKIError("'ca' is reserved for the CA certificate copy")
    _check_days(days)
    out = Path(out_dir)
    cert_file, key_file, ca_copy = (
        out / f"{name}.pem",
        out / f"{name}.key",
        out / "ca.pem",
    )
    ca_cert, ca_key = _load_ca(Path(ca_cert_path), Path(ca_key_path))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if not overwrite:
        existing = [str(p) for p in (cert_file, key_file) if p.exists()]
        if ca_copy.exists() and ca_copy.read_bytes() != ca_pem:
            existing.append(f"{ca_copy} (a different CA)")
        if existing:
            raise PKIError(
                f"refusing to overwrite {', '.join(existing)}; pass overwrite=True to replace"
            )
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if binding is not None:
        uri = binding.uri if binding.uri is not None else f"{BINDING_URI}{binding.kind}:{binding.subject}"
        names.append(x509.UniformResourceIdentifier(uri))
    key = _new_key()
    cert = (
        _leaf_builder(ca_cert, ca_key, key, name, days, names)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert_file, cert, key_file, key, replace=overwrite)
    _write_file(ca_copy, ca_pem, 0o644, replace=True)
    log.info(
        "issued client certificate {name} serial {serial} in {out_dir}",
        name=name,
        serial=f"{cert.serial_number:#x}",
        out_dir=str(out),
    )
    return IssuedCert(
        cert_path=cert_file,
        key_path=key_file,
        ca_path=ca_copy,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        binding=binding,
    )


def describe_cert(path: StrPath, kinds: Iterable[BindingKind] = ()) -> CertInfo:
    """Summarize the first certificate in a PEM file (its bindings as cert_bindings reads them)."""
    cert = _load_cert(Path(path))
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        common_name=cert_common_name(cert),
        serial=f"{cert.serial_number:#x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        is_ca=_is_ca(cert),
        bindings=cert_bindings(cert, kinds),
    )


def cert_bindings(cert: x509.Certificate, kinds: Iterable[BindingKind] = ()) -> tuple[Binding, ...]:
    """Every binding in a client certificate's SAN URIs, in their order: those of `kinds` (in the URI
    each kind writes), and any urn:bsscihub:binding:{kind}:{subject}, whichever family declares it."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    kinds = tuple(kinds)
    found: list[Binding] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        binding = next((b for b in (k.read(uri) for k in kinds) if b is not None), None)
        if binding is None and uri.lower().startswith(BINDING_URI):
            kind, _, subject = uri[len(BINDING_URI):].partition(":")
            if _KIND.fullmatch(kind) and (subject == "" or _SUBJECT.fullmatch(subject)):
                binding = Binding(kind, subject, uri)
        if binding is not None and binding not in found:
            found.append(binding)
    return tuple(found)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_builder(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    key: rsa.RSAPrivateKey,
    common_name: str,
    days: int,
    names: list[x509.GeneralName],
) -> x509.CertificateBuilder:
    now = _now()
    # A leaf outliving its CA would only fail later, at the base station.
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PKIError(f"the CA {ca_cert.subject.rfc4514_string()} has expired")
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(aki, critical=False)
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PKIError(f"cannot read certificate {path}: {e.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PKIError(f"{path} does not hold a PEM certificate") from None


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise PKIError(f"cannot read CA key {key_path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise PKIError(
            f"{key_path} does not hold an unencrypted PEM private key"
        ) from None
    if not isinstance(key, _ISSUER_KEY_TYPES):
        raise PKIError(f"{key_path}: this key type cannot sign certificates")
    if key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} is not the key of the CA certificate {cert_path}")
    if not _is_ca(cert):
        raise PKIError(
            f"{cert_path} is not a CA certificate (basicConstraints CA:true)"
        )
    return cert, key


def _needs_creating(cert_file: Path, key_file: Path) -> bool:
    cert_exists, key_exists = cert_file.exists(), key_file.exists()
    if cert_exists and key_exists:
        return False
    if cert_exists or key_exists:
        present, missing = (
            (cert_file, key_file) if cert_exists else (key_file, cert_file)
        )
        raise PKIError(
            f"{present} exists but {missing} does not; restore it, or remove"
            f" {present} to create a new pair"
        )
    return True


def _check_days(days: int) -> None:
    if days < 1:
        raise PKIError(f"validity must be at least one day, not {days}")


def _check_hostname(hostname: str) -> str:
    labels = hostname.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if (
        not hostname.isascii()
        or len(hostname) > 253
        or not labels
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
    ):
        raise PKIError(f"not a DNS name (use the ASCII/punycode form): {hostname!r}")
    return hostname


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def cert_common_name(cert: x509.Certificate) -> str | None:
    """The certificate's subject CN (the first, if several); None without one."""
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _write_pair(
    cert_file: Path,
    cert: x509.Certificate,
    key_file: Path,
    key: rsa.RSAPrivateKey,
    *,
    replace: bool,
) -> None:
    # PKCS#1 ("BEGIN RSA PRIVATE KEY"): the form every base-station firmware
    # import we know of accepts; PKCS#8 is not universal on embedded stacks.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    _write_file(key_file, key_pem, 0o600, replace=replace)
    try:
        _write_file(
            cert_file,
            cert.public_bytes(serialization.Encoding.PEM),
            0o644,
            replace=replace,
        )
    except BaseException:
        # Never leave half a pair: the next run would refuse to continue.
        if not replace:
            key_file.unlink(missing_ok=True)
        raise


def _write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write data to path with mode set at creation, so a key is never readable
    by others, not even for a moment; with replace, swap it in atomically."""
    # New directories hold private keys: keep them private too.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PKIError(
            f"{target} appeared while writing it; another process is at work"
        ) from None
    except OSError as e:
        raise PKIError(f"cannot create {target}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode & 0o044:
                # The umask may have narrowed a public file; widen it to what was asked.
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
