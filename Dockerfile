# syntax=docker/dockerfile:1
# jobqueue-exporter image: docker build -t jobqueue-exporter .
# Builder: build the wheel and install it with its dependencies into a virtualenv (binary wheels only).
FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: /wheels/*.whl

# Final stage: the same slim Python with only the installed package; no compiler, no sources, no wheel.
FROM python:3.12-slim
LABEL org.opencontainers.image.title="jobqueue-exporter" \
      org.opencontainers.image.description="Prometheus exporter for PostgreSQL-backed job queues" \
      org.opencontainers.image.source="https://github.com/jobqueue-exporter/jobqueue-exporter" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 jobqueue \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin jobqueue
COPY --from=builder /opt/venv /opt/venv
# numeric, so Kubernetes can verify runAsNonRoot; the Helm chart runs it as the same UID
USER 10001:10001
EXPOSE 17410
ENTRYPOINT ["jobqueue-exporter"]
# mount the config at this path (the Helm chart mounts its ConfigMap there and adds --listen)
CMD ["run", "--config", "/etc/jobqueue-exporter/config.yaml"]
