# bsscihub container image: the hub in a virtualenv on Debian, run as an unprivileged user.
#
#   docker build -t bsscihub .
#   docker run -p 8080:8080 -p 16017:16017 -v hub-config:/config -v hub-data:/data -v hub-certs:/certs bsscihub
#
# docker-compose.yml starts it with Mosquitto and PostgreSQL. BASE may name any Debian 12
# image (e.g. one built locally where registries are out of reach).
ARG BASE=debian:bookworm-slim

# --- build: wheels for the hub and everything it needs (compilers stay in this stage)
FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.rst LICENSE MANIFEST.in ./
COPY etc/hub.yaml etc/hub.yaml
COPY twisted twisted
COPY bsscihub bsscihub
RUN python3 -m venv /opt/bsscihub \
 && /opt/bsscihub/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/bsscihub/bin/pip install --no-cache-dir ".[postgresql,cluster]" \
 && /opt/bsscihub/bin/twistd --help | grep -q "bsscihub " \
 && /opt/bsscihub/bin/bsscihub config check >/dev/null
# The last two also write Twisted's plugin caches (dropin.cache), which the hub's user could not
# write at run time; the byte code pip compiled stays, so start-up compiles nothing.

# --- runtime: Python, the virtualenv, the entry point; nothing else
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 bsscihub \
 && useradd --system --uid 10001 --gid bsscihub --home-dir /data --no-create-home --shell /usr/sbin/nologin bsscihub \
 && mkdir -p /config /data /certs \
 && chown bsscihub:bsscihub /config /data /certs
COPY --from=build /opt/bsscihub /opt/bsscihub
COPY deploy/entrypoint.sh /usr/local/bin/bsscihub-entrypoint
COPY deploy/healthcheck.py /usr/local/lib/bsscihub-healthcheck.py

# The image's layout, as environment overrides of the sample configuration (see README.rst):
# data and certificates on their volumes, the web server on every interface of the container.
ENV PATH=/opt/bsscihub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HUB_CONFIG=/config/hub.yaml \
    HUB_PASSWORD_FILE=/data/initial-admin-password \
    BSSCIHUB_DATA_DIR=/data \
    BSSCIHUB_TLS_CA=/certs/ca.pem \
    BSSCIHUB_TLS_CA_KEY=/certs/ca.key \
    BSSCIHUB_TLS_CERT=/certs/hub.pem \
    BSSCIHUB_TLS_KEY=/certs/hub.key \
    BSSCIHUB_WEB_LISTEN=tcp:8080 \
    BSSCIHUB_LOG_FORMAT=json

USER bsscihub:bsscihub
WORKDIR /data
VOLUME ["/config", "/data", "/certs"]
EXPOSE 8080 16017

# The liveness probe: the process serves HTTP. A broker outage does not fail it (the outbox covers it).
# Moved web.listen? Set HUB_HEALTH_URL too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/lib/bsscihub-healthcheck.py"]

ENTRYPOINT ["bsscihub-entrypoint"]
CMD ["hub"]
