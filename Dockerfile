# syntax=docker/dockerfile:1
# One image for every fanout process; the command picks the role: `fanout edge` (default)
# or `fanout ingest`. docker-compose.yml runs the whole cluster from it.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore lets in only what the package needs: pyproject.toml, the README and sources.
COPY . .
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # In a container the edge must listen beyond loopback.
    FANOUT_EDGE_HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels fanout \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fanout
USER fanout
WORKDIR /tmp
EXPOSE 8000 9100
ENTRYPOINT ["fanout"]
CMD ["edge"]
