# syntax=docker/dockerfile:1
# PocketLLM Gateway. Multi-stage: compile llama-cpp-python (llama.cpp) once, ship only wheels and source.
# Docker cannot run on the machines this project is developed on; this file is kept correct by reading.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY engine ./engine
COPY auth ./auth
COPY telemetry ./telemetry
# Wheels for every runtime dependency (llama-cpp-python compiles here, for a portable CPU target).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && rm /wheels/pocketllm_gateway-*.whl

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 pocketllm \
    && mkdir -p /data/models /data/state && chown -R pocketllm:pocketllm /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY --chown=pocketllm:pocketllm gateway ./gateway
COPY --chown=pocketllm:pocketllm engine ./engine
COPY --chown=pocketllm:pocketllm auth ./auth
COPY --chown=pocketllm:pocketllm telemetry ./telemetry
COPY --chown=pocketllm:pocketllm configs ./configs
COPY --chown=pocketllm:pocketllm models/registry.toml ./models/registry.toml
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    POCKETLLM_MODELS_DIR=/data/models \
    POCKETLLM_DATA_DIR=/data/state
USER pocketllm
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "gateway.cli"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
