"""Client certificates for simulated base stations: one per station, issued from the hub CA
with the station's EUI inside, kept in a directory so later runs reuse them."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["station_certs"]


def _paths(out_dir: Path, eui: int) -> tuple[Path, Path]:
    name = f"bs-{eui:016x}"
    return out_dir / f"{name}.pem", out_dir / f"{name}.key"


def _issue(ca: str, ca_key: str, out_dir: str, euis: list[int], overwrite: bool) -> None:
    from bsscihub.pki import issue_client_cert
    from bsscihub.protocols.bssci.identity import STATION

    for eui in euis:
        cert, key = _paths(Path(out_dir), eui)
        if overwrite or not (cert.exists() and key.exists()):
            issue_client_cert(ca, ca_key, cert.stem, out_dir, days=30, binding=STATION.bind(f"{eui:016x}"),
                              overwrite=True)


def station_certs(ca: str, ca_key: str, euis: list[int], out_dir: Path) -> list[tuple[str, str]]:
    """(cert, key) paths for every EUI, issuing the missing ones in parallel.

    RSA key generation costs ~0.1 s per station, hence the reuse and the
    process pool; certificates from another CA are replaced.
    """
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    copy = out_dir / "ca.pem"
    overwrite = copy.exists() and copy.read_bytes() != Path(ca).read_bytes()
    missing = [e for e in euis if overwrite or not all(p.exists() for p in _paths(out_dir, e))]
    workers = min(os.cpu_count() or 1, max(1, len(missing) // 8))
    if workers > 1:
        chunks = [missing[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            for future in [pool.submit(_issue, ca, ca_key, str(out_dir), c, overwrite) for c in chunks]:
                future.result()
    elif missing:
        _issue(ca, ca_key, str(out_dir), missing, overwrite)
    return [tuple(str(p) for p in _paths(out_dir, e)) for e in euis]  # type: ignore[misc]
