"""Tests for the development PKI: what the CA, server and client certificates contain
(bindings too), who they verify against, and how their files are written."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bsscihub.pki import (
    Binding,
    BindingKind,
    PKIError,
    cert_bindings,
    check_kinds,
    create_ca,
    describe_cert,
    issue_client_cert,
    issue_server_cert,
)


@attrs.frozen
class CA:
    cert: Path
    key: Path

    def load(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    d = tmp_path_factory.mktemp("ca") / "certs"
    assert create_ca(d / "ca.pem", d / "ca.key")
    return CA(d / "ca.pem", d / "ca.key")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    d = tmp_path_factory.mktemp("other")
    assert create_ca(d / "ca.pem", d / "ca.key", common_name="some other CA")
    return CA(d / "ca.pem", d / "ca.key")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def client_verifier(ca_cert: x509.Certificate) -> verification.ClientVerifier:
    return (
        verification.PolicyBuilder()
        .store(verification.Store([ca_cert]))
        .build_client_verifier()
    )


def test_ca_is_a_constrained_self_signed_ca(ca: CA) -> None:
    cert = ca.load()
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "bsscihub development CA"
    )
    cert.verify_directly_issued_by(cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ext(cert, x509.SubjectKeyIdentifier)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(
        days=3650
    )


def test_key_file_is_private_from_the_start(tmp_path: Path) -> None:
    # A permissive umask must not widen the key, a strict one must not hide the cert.
    old = os.umask(0)
    try:
        assert create_ca(tmp_path / "a" / "ca.pem", tmp_path / "a" / "ca.key")
    finally:
        os.umask(0o077)
    try:
        assert create_ca(tmp_path / "b" / "ca.pem", tmp_path / "b" / "ca.key")
    finally:
        os.umask(old)
    for d in ("a", "b"):
        assert mode(tmp_path / d / "ca.key") == 0o600
        assert mode(tmp_path / d / "ca.pem") == 0o644
    key = serialization.load_pem_private_key(
        (tmp_path / "a" / "ca.key").read_bytes(), None
    )
    assert key.public_key() == load(tmp_path / "a" / "ca.pem").public_key()


def test_create_ca_is_idempotent(tmp_path: Path) -> None:
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    assert create_ca(cert, key)
    before = (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns)
    assert create_ca(cert, key) is False
    assert (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns) == before


@pytest.mark.parametrize("keep", ["ca.pem", "ca.key"])
def test_create_ca_refuses_half_a_pair(tmp_path: Path, keep: str) -> None:
    (tmp_path / keep).write_bytes(b"left over")
    with pytest.raises(PKIError, match="exists but"):
        create_ca(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep]
    assert (tmp_path / keep).read_bytes() == b"left over"


def test_server_cert(ca: CA, tmp_path: Path, umask_022: None) -> None:
    cert_path, key_path = tmp_path / "hub.pem", tmp_path / "hub.key"
    assert issue_server_cert(
        ca.cert,
        ca.key,
        cert_path,
        key_path,
        hostnames=["localhost", "hub.example.org"],
        ips=["127.0.0.1", "::1"],
    )
    assert mode(key_path) == 0o600 and mode(cert_path) == 0o644
    cert = load(cert_path)
    cert.verify_directly_issued_by(ca.load())
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "hub.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert not ext(cert, x509.BasicConstraints).value.ca
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.load(), x509.SubjectKeyIdentifier).value.digest
    ext(cert, x509.SubjectKeyIdentifier)

    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.load()]))
        .build_server_verifier(verification.DNSName("hub.example.org"))
    )
    verifier.verify(cert, [])

    before = cert_path.read_bytes()
    assert issue_server_cert(ca.cert, ca.key, cert_path, key_path) is False
    assert cert_path.read_bytes() == before


@pytest.mark.parametrize(
    ("hostnames", "ips", "message"),
    [
        (["bad host"], [], "not a DNS name"),
        (["-leading.example"], [], "not a DNS name"),
        (["bücher.example"], [], "punycode"),
        (["localhost"], ["300.1.1.1"], "not an IP address"),
        ([], [], "at least one"),
    ],
)
def test_server_cert_refuses_bad_names(
    ca: CA, tmp_path: Path, hostnames: list[str], ips: list[str], message: str
) -> None:
    with pytest.raises(PKIError, match=message):
        issue_server_cert(
            ca.cert,
            ca.key,
            tmp_path / "h.pem",
            tmp_path / "h.key",
            hostnames=hostnames,
            ips=ips,
        )
    assert list(tmp_path.iterdir()) == []


def test_client_cert(ca: CA, other_ca: CA, tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "bs"
    issued = issue_client_cert(ca.cert, ca.key, "bs-hall_3.north", out, days=30)
    assert issued.cert_path == out / "bs-hall_3.north.pem"
    assert issued.key_path == out / "bs-hall_3.north.key"
    assert issued.ca_path == out / "ca.pem"
    assert issued.ca_path.read_bytes() == ca.cert.read_bytes()
    assert mode(issued.key_path) == 0o600
    assert mode(issued.cert_path) == 0o644 and mode(issued.ca_path) == 0o644
    assert issued.binding is None

    cert = load(issued.cert_path)
    assert cert_bindings(cert) == ()
    assert cert.serial_number == issued.serial
    assert cert.not_valid_after_utc == issued.not_after
    assert issued.not_after - datetime.datetime.now(datetime.UTC) < datetime.timedelta(
        days=31
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "bs-hall_3.north"
    )
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_encipherment or ku.value.key_cert_sign)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bs-hall_3.north"]
    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()

    verified = client_verifier(ca.load()).verify(cert, [])
    assert verified.chain[-1] == ca.load()
    with pytest.raises(verification.VerificationError):
        client_verifier(other_ca.load()).verify(cert, [])


def test_client_serials_are_random(ca: CA, tmp_path: Path) -> None:
    a = issue_client_cert(ca.cert, ca.key, "a", tmp_path)
    b = issue_client_cert(ca.cert, ca.key, "b", tmp_path)
    assert a.serial != b.serial
    assert a.serial.bit_length() > 64


def test_client_cert_from_another_ca_does_not_verify(
    ca: CA, other_ca: CA, tmp_path: Path
) -> None:
    issued = issue_client_cert(other_ca.cert, other_ca.key, "intruder", tmp_path)
    with pytest.raises(verification.VerificationError):
        client_verifier(ca.load()).verify(load(issued.cert_path), [])


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden",
        "..",
        "../escape",
        "a/b",
        "a b",
        "-flag",
        "bs\n1",
        "bäse",
        "x" * 65,
        "ca",
        "CA",
    ],
)
def test_client_cert_refuses_bad_names(ca: CA, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(PKIError):
        issue_client_cert(ca.cert, ca.key, name, out)
    assert not out.exists()


def test_client_cert_refuses_to_overwrite(ca: CA, other_ca: CA, tmp_path: Path) -> None:
    first = issue_client_cert(ca.cert, ca.key, "bs-1", tmp_path)
    before = first.cert_path.read_bytes()
    with pytest.raises(PKIError, match="overwrite"):
        issue_client_cert(ca.cert, ca.key, "bs-1", tmp_path)
    assert first.cert_path.read_bytes() == before

    second = issue_client_cert(ca.cert, ca.key, "bs-1", tmp_path, overwrite=True)
    assert second.serial != first.serial
    assert load(second.cert_path).serial_number == second.serial
    assert mode(second.key_path) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # Another base station may share the directory, but not with another CA.
    issue_client_cert(ca.cert, ca.key, "bs-2", tmp_path)
    with pytest.raises(PKIError, match="different CA"):
        issue_client_cert(other_ca.cert, other_ca.key, "bs-3", tmp_path)


THING = BindingKind("test.thing", "a thing", "a thing's id")
LEGACY = BindingKind("test.old", "an old device", "its hex id", lambda s: s.lower() if s.isalnum() else None,
                     uri="urn:example:old:", field="oldId", aliases=("old-device",))
ROLE = BindingKind("test.role", "a role, no subject")


def uris(cert: x509.Certificate) -> list[str]:
    return ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


def test_client_cert_bound_to_a_generic_kind_reads_back_without_the_kind(ca: CA, tmp_path: Path) -> None:
    issued = issue_client_cert(ca.cert, ca.key, "thing-1", tmp_path, binding=THING.bind(" abc.1~x "))
    assert issued.binding == Binding("test.thing", "abc.1~x")
    cert = load(issued.cert_path)
    assert uris(cert) == ["urn:bsscihub:binding:test.thing:abc.1~x"]
    # any family's generic binding is seen by anyone reading the certificate, declared or not
    assert cert_bindings(cert) == (Binding("test.thing", "abc.1~x"),)
    assert cert_bindings(cert, [LEGACY]) == (Binding("test.thing", "abc.1~x"),)
    client_verifier(ca.load()).verify(cert, [])


def test_a_kind_with_its_own_uri_writes_and_reads_it(ca: CA, tmp_path: Path) -> None:
    issued = issue_client_cert(ca.cert, ca.key, "old-1", tmp_path, binding=LEGACY.bind("AB12"))
    cert = load(issued.cert_path)
    assert uris(cert) == ["urn:example:old:ab12"]
    assert cert_bindings(cert, [THING, LEGACY]) == (Binding("test.old", "ab12"),)
    assert cert_bindings(cert) == ()  # that URI is the kind's own: readable only by whom knows the kind
    role = load(issue_client_cert(ca.cert, ca.key, "role-1", tmp_path, binding=ROLE.bind()).cert_path)
    assert uris(role) == ["urn:bsscihub:binding:test.role:"]
    assert cert_bindings(role) == cert_bindings(role, [ROLE]) == (Binding("test.role"),)


def test_bad_bindings_are_refused_naming_the_kind(ca: CA, tmp_path: Path) -> None:
    for kind, subject, message in ((THING, None, "bad test.thing subject None: expected a thing's id"),
                                   (THING, "a b", "bad test.thing subject 'a b'"),
                                   (THING, "x" * 129, "bad test.thing subject"),
                                   (LEGACY, "ab-12", "bad test.old subject 'ab-12': expected its hex id"),
                                   (ROLE, "x", "bound to test.role takes no subject")):
        with pytest.raises(PKIError, match=message.replace("(", r"\(").replace(")", r"\)")):
            kind.bind(subject)
    with pytest.raises(ValueError, match="bad binding kind"):
        BindingKind("Thing", "no family prefix")
    assert list(tmp_path.iterdir()) == []


def test_kinds_from_several_families_must_not_collide() -> None:
    assert list(check_kinds([THING, LEGACY, ROLE])) == ["test.thing", "test.old", "test.role"]
    for clash, what in ((BindingKind("test.thing", "again"), "name 'test.thing'"),
                        (BindingKind("other.x", "x", uri="URN:example:old:"), "URI 'urn:example:old:'"),
                        (BindingKind("other.y", "y", field="oldId"), "field 'oldId'"),
                        (BindingKind("other.z", "z", aliases=("test.thing",)), "name 'test.thing'"),
                        (BindingKind("old-device.z", "z"), None)):
        if what is None:
            assert "old-device.z" in check_kinds([LEGACY, clash])
            continue
        with pytest.raises(ValueError, match=f"share the {what}"):
            check_kinds([THING, LEGACY, clash])


def test_issuing_needs_the_matching_ca_key(
    ca: CA, other_ca: CA, tmp_path: Path
) -> None:
    with pytest.raises(PKIError, match="not the key"):
        issue_client_cert(ca.cert, other_ca.key, "bs-1", tmp_path / "x")
    leaf = issue_client_cert(ca.cert, ca.key, "leaf", tmp_path / "leaf")
    with pytest.raises(PKIError, match="not a CA"):
        issue_client_cert(leaf.cert_path, leaf.key_path, "bs-1", tmp_path / "y")
    with pytest.raises(PKIError, match="cannot read"):
        issue_client_cert(tmp_path / "missing.pem", ca.key, "bs-1", tmp_path / "z")


def test_describe_cert(ca: CA, tmp_path: Path) -> None:
    issued = issue_client_cert(
        ca.cert, ca.key, "bs-7", tmp_path, binding=LEGACY.bind("0011223344556677")
    )
    info = describe_cert(issued.cert_path, [LEGACY])
    cert = load(issued.cert_path)
    assert info.subject == "CN=bs-7"
    assert info.issuer == "CN=bsscihub development CA"
    assert info.common_name == "bs-7"
    assert info.serial == f"{issued.serial:#x}"
    assert info.not_after == issued.not_after
    assert info.not_before == cert.not_valid_before_utc
    assert info.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert not info.is_ca
    assert info.bindings == (Binding("test.old", "0011223344556677"),)
    assert describe_cert(issued.cert_path).bindings == ()
    assert describe_cert(ca.cert).is_ca

    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(PKIError, match="PEM"):
        describe_cert(tmp_path / "junk.pem")
    with pytest.raises(PKIError, match="cannot read"):
        describe_cert(tmp_path / "absent.pem")
