# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build -t pdorch:0.1.0 .                        scheduler, KV broker, agent (default)
#   docker build --target vllm -t pdorch-vllm:0.1.0 .     vLLM + pdorch (its KV connector)
# The default is the vLLM release the connector is tested with (the "vllm" extra in pyproject.toml);
# to build on another:
#   docker build --target vllm --build-arg VLLM_IMAGE=vllm/vllm-openai:<tag> ...
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------------------- pdorch-vllm
# vLLM loads pdorch's connector (workers.engines.vllm.connector) by module path, so pdorch is
# installed into the image's own Python. The base image's entrypoint is replaced by the
# manifests' command.
FROM ${VLLM_IMAGE} AS vllm
COPY . /tmp/pdorch-src
RUN python3 -m pip install --no-cache-dir /tmp/pdorch-src && rm -rf /tmp/pdorch-src

# ---------------------------------------------------------------------------- pdorch (default)
FROM python:3.11-slim AS pdorch
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /tmp/pdorch-src
RUN pip install /tmp/pdorch-src && rm -rf /tmp/pdorch-src \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pdorch
USER 10001:10001
WORKDIR /home/pdorch
# HTTP API, control plane, agent KV endpoint, KV broker.
EXPOSE 8000 5555 5600 5700
ENTRYPOINT ["pdorch"]
CMD ["--help"]
