"""The mioty family's certificate bindings: certificates issued before bindings existed (a station's
EUI, an application center's role in the SAN) read as bssci.station and scaci.ac bindings, and a
certificate bound to anything but a station is no station."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bsscihub.family import ICertificateBindings, binding_kinds, installed_families
from bsscihub.pki import Binding, cert_bindings, create_ca, issue_client_cert
from bsscihub.protocols.bssci.identity import (
    APPLICATION_CENTER,
    BINDINGS,
    STATION,
    cert_station,
    is_application_center,
    station_identity_problem,
)

EUI = "70b3d59cd0000001"


def old_cert(*uris: str) -> x509.Certificate:
    """A client certificate as the hub wrote them before bindings, built here without bsscihub.pki."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("old"), *(x509.UniformResourceIdentifier(u) for u in uris)]
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(0x1234).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )


def problem(cert: x509.Certificate, eui: str = EUI, **kw: object) -> str | None:
    args: dict[str, object] = {"pinned_serial": None, "registered": False, "connected_serial": None,
                               "self_register": True, **kw}
    return station_identity_problem(cert, eui, **args)  # type: ignore[arg-type]


def test_an_old_station_certificate_reads_as_a_station_binding() -> None:
    for uri in (f"urn:dev:mac:{EUI}", f"urn:dev:mac:{EUI.upper()}", f"URN:DEV:MAC:{EUI}"):
        cert = old_cert(uri)
        assert cert_bindings(cert, BINDINGS) == (Binding("bssci.station", EUI),)
        assert cert_station(cert) == EUI and not is_application_center(cert)
        assert problem(cert) is None
        assert problem(cert, "00000000000000bb") == f"the client certificate belongs to base station {EUI}, not to" \
                                                    " 00000000000000bb"
    assert cert_station(old_cert("urn:dev:mac:70b3")) is None  # not an EUI-64: no binding


def test_an_old_application_center_certificate_reads_as_one_and_is_no_station() -> None:
    cert = old_cert("urn:bsscihub:role:application-center")
    assert cert_bindings(cert, BINDINGS) == (Binding("scaci.ac"),)
    assert is_application_center(cert) and cert_station(cert) is None
    refused = problem(cert)
    assert refused is not None and "is bound to scaci.ac, not to a base station" in refused
    # Not even next to a station's EUI: an application center's certificate is never a station's.
    both = old_cert(f"urn:dev:mac:{EUI}", "urn:bsscihub:role:application-center")
    assert problem(both) is not None and "scaci.ac" in (problem(both) or "")
    # another family's binding, in the generic form, is refused alike
    assert "bound to gate.controller" in (problem(old_cert("urn:bsscihub:binding:gate.controller:g1")) or "")


def test_new_certificates_carry_the_same_names_as_before(tmp_path: Path) -> None:
    """So a hub downgraded to a release before bindings still reads them."""
    create_ca(tmp_path / "ca.pem", tmp_path / "ca.key")
    for name, binding, uri in (("bs", STATION.bind("70B3-D59C-D000-0001"), f"urn:dev:mac:{EUI}"),
                               ("ac", APPLICATION_CENTER.bind(), "urn:bsscihub:role:application-center")):
        issued = issue_client_cert(tmp_path / "ca.pem", tmp_path / "ca.key", name, tmp_path, binding=binding)
        cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]


def test_the_family_declares_its_kinds() -> None:
    family = installed_families()["mioty"]
    assert ICertificateBindings.providedBy(family)
    kinds = binding_kinds({"mioty": family})
    assert list(kinds) == ["bssci.station", "scaci.ac"]
    assert (kinds["bssci.station"].field, kinds["bssci.station"].aliases) == ("bsEui", ("base-station",))
    assert kinds["scaci.ac"].aliases == ("application-center",) and not kinds["scaci.ac"].takes_subject
    assert set(binding_kinds(installed_families())) >= set(kinds)  # no other family's kind collides
