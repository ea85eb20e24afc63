# syntax=docker/dockerfile:1
#
# rebuildd container image.
#
#   docker build -t rebuildd .
#
# Running it against the host's libvirt (qemu:///system): bind-mount the libvirt socket
# directory and the state directory. The state directory MUST be mounted at the same path on
# both sides, because rebuildd hands disk paths under it to the host's libvirtd/QEMU:
#
#   docker run -d --name rebuildd -p 8774:8774 \
#     -v /var/run/libvirt:/var/run/libvirt \
#     -v /var/lib/rebuildd:/var/lib/rebuildd \
#     -v /etc/rebuildd/tokens.toml:/etc/rebuildd/tokens.toml:ro \
#     -e REBUILDD_LIBVIRT_URI=qemu:///system \
#     -e REBUILDD_ALLOWED_HOSTS=compute.example \
#     rebuildd
#
# Safe by default: the API listens on 0.0.0.0 inside the container (so -p can reach it) and
# therefore requires authentication. The image sets REBUILDD_AUTH=token with the tokens at
# /etc/rebuildd/tokens.toml: mount that file (see the README's authentication section), or
# set REBUILDD_AUTH=keystone and the REBUILDD_KEYSTONE_* variables. Without either the
# container stops at start with one line saying what is missing. REBUILDD_AUTH=none is refused
# on 0.0.0.0 unless REBUILDD_ALLOW_INSECURE_LISTEN=true, which gives an admin API to anyone
# who can reach the port: never with a published port. Requests whose Host header is not
# loopback or a name of REBUILDD_ALLOWED_HOSTS (comma-separated) are refused with 400, so set
# it to the names clients use to reach the container. Without REBUILDD_LIBVIRT_URI the daemon
# drives libvirt's in-memory test driver (no real guest).
#
# The container runs as root on purpose: it must connect to the host's root-owned libvirt
# socket and create disk files that the host's QEMU can open. Other settings: any REBUILDD_*
# variable (see packaging/rebuildd.env.example), e.g. --env-file packaging/rebuildd.env.
# The default CMD applies the database migrations, then serves the API on 0.0.0.0:8774 (with
# token authentication, as above).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: wheels of rebuildd and every dependency (libvirt-python builds from source) ---
FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the wheel needs; alembic/ is force-included as rebuildd/_alembic (pyproject).
COPY pyproject.toml README.md ./
COPY rebuildd ./rebuildd
COPY alembic ./alembic
RUN pip wheel --wheel-dir /wheels .

# --- runtime ---
FROM ${PYTHON_IMAGE} AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt0 qemu-utils e2fsprogs util-linux tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# Same layout as the systemd install convention: a virtualenv at /opt/rebuildd.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/rebuildd \
    && /opt/rebuildd/bin/pip install --no-index --find-links /wheels rebuildd

ENV PATH=/opt/rebuildd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REBUILDD_STATE_DIR=/var/lib/rebuildd \
    REBUILDD_LISTEN_HOST=0.0.0.0 \
    REBUILDD_AUTH=token \
    REBUILDD_TOKENS_FILE=/etc/rebuildd/tokens.toml

VOLUME /var/lib/rebuildd
EXPOSE 8774

# tini forwards SIGTERM so rebuildd drains running jobs (REBUILDD_DRAIN_TIMEOUT, default 120 s):
# give `docker stop` a matching grace period, e.g. `docker stop -t 150 rebuildd`.
ENTRYPOINT ["tini", "--"]
CMD ["sh", "-c", "rebuildd db upgrade && exec rebuildd serve"]
