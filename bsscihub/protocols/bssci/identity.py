"""Which base station or application center a TLS client may be: its certificate is its identity.
A certificate bound to a station's EUI is that station; an unbound one is only the station it is pinned to."""

from __future__ import annotations

from cryptography import x509

from bsscihub.contract import eui64
from bsscihub.pki import Binding, BindingKind, cert_bindings

__all__ = ["APPLICATION_CENTER", "BINDINGS", "STATION", "cert_station", "is_application_center",
           "station_identity_problem"]


def _eui(text: str) -> str | None:
    return eui64(text.replace("-", "").replace(":", ""))


STATION = BindingKind(
    "bssci.station", "a base station (BSSCI)", "the station's bsEui (EUI-64, 16 hex digits)", _eui,
    # RFC 9039 device URN ("mac" covers EUI-64): what station certificates carried before bindings
    uri="urn:dev:mac:", field="bsEui", aliases=("base-station",),
)
APPLICATION_CENTER = BindingKind(
    "scaci.ac", "a mioty application center (SCACI)", uri="urn:bsscihub:role:application-center",
    aliases=("application-center",),
)
BINDINGS = (STATION, APPLICATION_CENTER)


def _serial(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def cert_station(cert: x509.Certificate) -> str | None:
    """The bsEui a client certificate is bound to, if any."""
    return next((b.subject for b in cert_bindings(cert, BINDINGS) if b.kind == STATION.name), None)


def is_application_center(cert: x509.Certificate) -> bool:
    """Whether a client certificate was issued for a mioty application center (SCACI)."""
    return Binding(APPLICATION_CENTER.name) in cert_bindings(cert, BINDINGS)


def station_identity_problem(
    cert: x509.Certificate,
    bs_eui: str,
    *,
    pinned_serial: str | None,
    registered: bool,
    connected_serial: int | None,
    self_register: bool,
) -> str | None:
    """Why `cert` may not connect as base station `bs_eui` (16 lower-case hex digits), or None.

    @param pinned_serial: the serial (hex) of the certificate the registered station last connected with.
    @param registered: whether the service center knows the station.
    @param connected_serial: the serial of the certificate of a connection currently holding `bs_eui`.
    @param self_register: whether an unknown station with an unbound certificate may register itself.

    A certificate bound to an EUI (issued with one, from the web or `certs issue-bs --eui`) may be
    that station only, registered or not; the binding is the admission. A certificate bound to
    anything else (an application center, another family's device) is no station at all. An unbound
    certificate may be a registered station only if that station is pinned to it (it registered
    itself with it), and an unknown station only with `self_register`, which pins it. So no second
    certificate can push a station off the network by reconnecting with its bsEui ("newest
    connection wins" stays for the station's own certificate).
    """
    bindings = cert_bindings(cert, BINDINGS)
    stations = [b.subject for b in bindings if b.kind == STATION.name]
    others = sorted({b.kind for b in bindings if b.kind != STATION.name})
    if others:
        return (
            f"the client certificate (serial {cert.serial_number:#x}) is bound to {', '.join(others)},"
            f" not to a base station; it cannot connect as {bs_eui}"
        )
    if stations:
        if bs_eui not in stations:
            return f"the client certificate belongs to base station {stations[0]}, not to {bs_eui}"
        return None
    serial = cert.serial_number
    if registered:
        if _serial(pinned_serial) == serial:
            return None
        return (
            f"base station {bs_eui} is registered with another certificate; this one"
            f" (serial {serial:#x}) is bound to no EUI and cannot take it over"
        )
    if connected_serial is not None and connected_serial != serial:
        return f"another certificate is connecting as base station {bs_eui}"
    if not self_register:
        return (
            f"base station {bs_eui} is not registered and its certificate (serial {serial:#x}) is bound to no"
            f" EUI; admit it with a certificate bound to its EUI (bsscihub certs issue-bs NAME --eui {bs_eui})"
            " or let unknown stations register themselves (bssci.self_register)"
        )
    return None
