# One image for the operator and the nodes: `pyrsia operator` or `pyrsia node --config ...`.
# Base pinned by version; pin by digest in release builds (docker buildx imagetools inspect).
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node/ node/
COPY operator/ operator/
COPY protos/ protos/
RUN python -m venv /opt/pyrsia && /opt/pyrsia/bin/pip install --no-compile . \
    && find /opt/pyrsia -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="pyrsia" \
      org.opencontainers.image.description="Pyrsia node and Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pyrsia \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/pyrsia --no-create-home pyrsia \
    && mkdir -p /var/lib/pyrsia /etc/pyrsia && chown 10001:10001 /var/lib/pyrsia
COPY --from=build /opt/pyrsia /opt/pyrsia
ENV PATH=/opt/pyrsia/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pyrsia
EXPOSE 7888 44000 9090
ENTRYPOINT ["pyrsia"]
CMD ["--help"]
