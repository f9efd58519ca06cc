# moe-watch agent image: slim, non-root, read-only root filesystem friendly, no build tools.
# Multi-arch (linux/amd64 + linux/arm64: x86 GPU instances and Graviton/Grace ones), e.g.
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t "$REGISTRY/moe-watch:0.1.0" --push .
# Reproducible inputs: the base is pinned by the digest of its multi-arch image index (refresh:
# docs/deploy.md "The image"), and every Python dependency by version and wheel hash
# (requirements.lock, scripts/lock.py).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.lock ./
RUN pip download --no-cache-dir --require-hashes --only-binary=:all: -d /wheels -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY moe_watch ./moe_watch
# moe-watch itself: no dependency resolution here (they are the locked wheels above)
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="moe-watch" \
      org.opencontainers.image.description="Per-node agent that watches Mixture-of-Experts LLM serving on GPU nodes, as Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/moe-watch/moe-watch" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 65532 --no-create-home moe-watch
COPY --from=build /wheels /wheels
COPY LICENSE /usr/share/doc/moe-watch/LICENSE
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/moe_watch-*.whl && rm -rf /wheels
USER 65532:65532
EXPOSE 9663
ENTRYPOINT ["moe-watch"]
CMD ["run", "--config", "/etc/moe-watch/config.yaml"]
