"""The container's health check: exit 0 if the hub's liveness probe answers 200, else 1.

HUB_HEALTH_URL overrides the probe's URL (default http://127.0.0.1:8080/health/live), e.g. after moving web.listen.
"""

import os
import sys
import urllib.request

URL = os.environ.get("HUB_HEALTH_URL", "http://127.0.0.1:8080/health/live")

try:
    with urllib.request.urlopen(URL, timeout=4) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
    print(f"unhealthy: {URL}: {e}", file=sys.stderr)
    sys.exit(1)
