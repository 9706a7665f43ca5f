# syntax=docker/dockerfile:1
# One image for every fanout process; the command picks the role: `fanout edge` (default)
# or `fanout ingest`. docker-compose.yml runs the whole cluster from it.
#
# Everything installed comes from the lock files, checked against their hashes: the image
# runs exactly the versions `make test` tested (requirements/runtime.txt, the production
# subset: no test tools, no embedded Valkey).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/build.txt requirements/runtime.txt requirements/
RUN pip install --require-hashes -r requirements/build.txt
# .dockerignore lets in only what the package needs: pyproject.toml, setup.py, the README,
# sources (with the browser client, clients/js/src, which the wheel's edge/static carries)
# and the lock files.
COPY . .
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # In a container the edge and the ingest's metrics/health port listen beyond loopback.
    FANOUT_EDGE_HOST=0.0.0.0 \
    FANOUT_INGEST_METRICS_HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/src/requirements,target=/requirements \
    --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --require-hashes -r /requirements/runtime.txt \
    && pip install --no-deps --no-index /wheels/fanout-*.whl \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fanout
USER fanout
WORKDIR /tmp
EXPOSE 8000 9100
# Liveness for both roles: an ingest worker (FANOUT_INGEST_METRICS_PORT set) answers
# /healthz on that port from its own event loop, an edge on FANOUT_EDGE_PORT (the check
# reads the variables only: a port set in a config file needs its variable too).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request; port = os.environ.get('FANOUT_INGEST_METRICS_PORT') or os.environ.get('FANOUT_EDGE_PORT', '8000'); urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["fanout"]
CMD ["edge"]
