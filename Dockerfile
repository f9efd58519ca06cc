# moe-watch agent image: slim, non-root, read-only root filesystem friendly, no build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moe_watch ./moe_watch
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 65532 --no-create-home moe-watch
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65532:65532
EXPOSE 9663
ENTRYPOINT ["moe-watch"]
CMD ["run", "--config", "/etc/moe-watch/config.yaml"]
