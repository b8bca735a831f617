"""What the tests of a cluster of twistd hubs share: HAProxy's path, a hub's readiness, the owner of a
station in Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin")


def ready(web: int, host: str = "127.0.0.1") -> bool:
    """Whether the hub whose web server listens on `web` answers /health/ready with 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{web}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def owner(redis: str, eui: str) -> str:
    """The node holding base station `eui` (16 hex digits) in the cluster on `redis`, or ""."""
    port = redis.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-cli", "-p", port, "-n", "0", "HGET", "bsscihub:owners", f"mioty/{eui}"],
                         capture_output=True, text=True, timeout=5).stdout.strip()
    return str(json.loads(out)["node"]) if out else ""
