# syntax=docker/dockerfile:1
#
# Notification worker image. One image, several commands:
#   worker run        (default)  one replica
#   worker migrate               Alembic upgrade head (alembic.ini + migrations/ in /app)
#   worker-admin ...             dead-letter admin
#   python -m worker.tooling.demo_provider ...   the demo provider
# The image has no HEALTHCHECK: only `worker run` serves /readyz, so compose sets it per service.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# pyproject names README.md as the readme: the build needs it.
COPY pyproject.toml README.md ./
COPY worker/ ./worker/
# Runtime dependencies only (no [dev] extra); a regular, non-editable install into the venv.
RUN pip install .

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
