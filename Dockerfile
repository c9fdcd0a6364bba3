# syntax=docker/dockerfile:1
#
# Notification worker image. One image, several commands:
#   worker run        (default)  one replica
#   worker migrate               Alembic upgrade head (alembic.ini + migrations/ in /app)
#   worker-admin ...             dead-letter admin
#   python -m worker.tooling.demo_provider ...   the demo provider
# The image has no HEALTHCHECK: only `worker run` serves /readyz, so compose sets one per
# service (`worker check`: exit 0 when /readyz on WORKER_METRICS_PORT answers 200).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The runtime dependencies exactly as locked (versions and hashes: `make lock` refreshes the
# file), in a layer of their own that a code change does not rebuild.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
# pyproject names README.md as the readme: the build needs it.
COPY pyproject.toml README.md ./
COPY worker/ ./worker/
# The project itself, a regular, non-editable install, nothing more (--no-deps).
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid worker --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini ./
COPY migrations/ ./migrations/
USER 10001:10001
# WORKER_METRICS_PORT in compose: /metrics, /healthz, /readyz
EXPOSE 9464
CMD ["worker", "run"]
