# respmeter container image.
#
#   docker build -t respmeter .
#   docker run --rm -p 127.0.0.1:6380:6380 -p 127.0.0.1:9380:9380 \
#       -e RESPMETER_UPSTREAM=rediss://default:PASSWORD@example.upstash.io:6379 \
#       -e RESPMETER_ALLOW_UNAUTHENTICATED=true -e RESPMETER_ALLOW_UNAUTHENTICATED_ADMIN=true \
#       -e RESPMETER_DAILY_CAP=10000 \
#       -v respmeter-state:/var/lib/respmeter respmeter
#
# Configured only through RESPMETER_* environment variables (`respmeter run --daily-cap` is
# RESPMETER_DAILY_CAP, and so on; see `docker run --rm respmeter run --help`). The image listens on all interfaces
# (0.0.0.0:6380 for Redis clients, 0.0.0.0:9380 for /metrics and /healthz), and the proxy refuses to
# listen beyond loopback without client authentication: you must choose, at `docker run` time,
# either RESPMETER_USERS=/path/to/users.toml (mounted; hashes from `respmeter hash-password`) or
# RESPMETER_ALLOW_UNAUTHENTICATED=true (only behind a private network/firewall). Likewise the admin
# endpoint: RESPMETER_ADMIN_TOKEN_FILE (or RESPMETER_ADMIN_TOKEN; /metrics and /api/* then need
# "Authorization: Bearer TOKEN", /healthz stays open for the HEALTHCHECK) or
# RESPMETER_ALLOW_UNAUTHENTICATED_ADMIN=true. The image sets none of them, so it fails closed instead
# of exposing your Redis quota, or your usage and key patterns, to anyone.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: install respmeter and its dependencies into a virtualenv --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# a C compiler for proxy/_speedups.c, the per-command hot path (only in this stage)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# README* is optional for the build (pyproject's readme); pyproject.toml makes the COPY non-empty
COPY pyproject.toml setup.py README* ./
COPY proxy ./proxy
# tzdata: IANA zones for --cap-timezone without relying on the OS zoneinfo. The extension is optional
# to pip (a machine without a compiler still installs, in pure Python); the image insists on it.
RUN python -m venv /opt/respmeter \
 && /opt/respmeter/bin/pip install . tzdata \
 && /opt/respmeter/bin/respmeter --version | tee /dev/stderr | grep -q "hot path: C"

# ---- runtime: slim, non-root ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 respmeter \
 && useradd --system --uid 10001 --gid respmeter --home-dir /var/lib/respmeter --no-create-home \
        --shell /usr/sbin/nologin respmeter \
 && install -d -o respmeter -g respmeter -m 0750 /var/lib/respmeter
COPY --from=build /opt/respmeter /opt/respmeter

ENV PATH=/opt/respmeter/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RESPMETER_LISTEN=0.0.0.0:6380 \
    RESPMETER_ADMIN=0.0.0.0:9380 \
    RESPMETER_STATE_DIR=/var/lib/respmeter

# usage state (SQLite): keep it on a volume, or caps restart from zero with the container
VOLUME ["/var/lib/respmeter"]
# 6380: Redis protocol (clients); 9380: admin HTTP (/metrics, /healthz, /api/usage)
EXPOSE 6380 9380

USER 10001:10001
WORKDIR /var/lib/respmeter

# /healthz answers 503 while the upstream is unreachable or over its provider quota (never sends a
# Redis command), so "unhealthy" means "clients cannot be served right now". The port follows
# RESPMETER_ADMIN.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; port = os.environ.get('RESPMETER_ADMIN', ':9380').rsplit(':', 1)[1]; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=4)"

STOPSIGNAL SIGTERM
ENTRYPOINT ["respmeter"]
CMD ["run"]
