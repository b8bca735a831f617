"""Which base station a TLS client may be: its certificate is its identity, checked once per `con`.
A certificate bound to an EUI is that station; an unbound one is only the station it is pinned to."""

from __future__ import annotations

from cryptography import x509

from bsscihub.pki import cert_bs_eui

__all__ = ["station_identity_problem"]


def _serial(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


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
    that station only, registered or not; the binding is the admission. An unbound certificate may
    be a registered station only if that station is pinned to it (it registered itself with it), and
    an unknown station only with `self_register`, which pins it. So no second certificate can push
    a station off the network by reconnecting with its bsEui ("newest connection wins" stays for
    the station's own certificate).
    """
    bound = cert_bs_eui(cert)
    if bound is not None:
        if bound != bs_eui:
            return f"the client certificate belongs to base station {bound}, not to {bs_eui}"
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
