# syntax=docker/dockerfile:1
# DurableCache: one image for every role -- `durablecache operator` (the default), `durablecache proxy`
# and the CLI (`copy`, `verify`, `migrate`, ...): docker run IMAGE <command> [args].
ARG PYTHON_IMAGE=python:3.11-slim

# Stage 1: build the durablecache wheel and install it, with every dependency pinned by
# constraints.txt, into a virtualenv that the runtime stage copies as a whole. The wheel's proxy
# modules are compiled with mypyc (setup.py), hence the C compiler in this stage only.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --constraint constraints.txt /dist/durablecache-*.whl \
 && /opt/venv/bin/durablecache --version

# Stage 2: the runtime, without build tools or sources; same base image so /opt/venv's interpreter
# symlinks stay valid.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 durablecache \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin durablecache
COPY --from=build /opt/venv /opt/venv
# Numeric user: Kubernetes' runAsNonRoot can only verify a numeric USER.
USER 10001:10001
WORKDIR /tmp
# 8080: operator health (/healthz); 9090: Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["durablecache"]
CMD ["operator"]
