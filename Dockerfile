# mistral-serve container image. Installs exactly as the README does (`make install`),
# runs `mistral-serve serve` as a non-root user, keeps the model cache on a volume path.
#
#   CPU (default):  docker build -t mistral-serve:0.1.0 .
#   CUDA + xformers: docker build --build-arg VARIANT=cuda -t mistral-serve:0.1.0-cuda .
#
# The CUDA variant takes torch's CUDA wheels from PyPI (they bundle the CUDA runtime; the
# node's NVIDIA driver comes in through the container toolkit) plus xformers' kernels.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# cpu: torch's CPU wheels; cuda: PyPI's CUDA wheels and xformers.
ARG VARIANT=cpu
ARG TORCH_SPEC=torch==2.13.0
ARG XFORMERS_SPEC=xformers==0.0.35

# make runs the install; g++ compiles the CPU paged-attention kernel on first start
# (-march=native: built on the node that runs it, into TORCH_EXTENSIONS_DIR).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make g++ \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 mistral && useradd --uid 10001 --gid 10001 --home-dir /home/mistral --create-home mistral

WORKDIR /opt/mistral-serve
COPY pyproject.toml Makefile README.md ./
COPY clients/ clients/
COPY model/ model/
COPY scheduler/ scheduler/
COPY server/ server/
RUN case "$VARIANT" in \
      cpu) torch_args="--index-url https://download.pytorch.org/whl/cpu" ;; \
      cuda) torch_args="" ;; \
      *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac \
    && make install VENV=/opt/mistral-serve/.venv EXTRAS= TORCH_SPEC="$TORCH_SPEC" \
         TORCH_PIP_ARGS="$torch_args" XFORMERS_SPEC="$XFORMERS_SPEC" \
    && rm -rf /root/.cache

# The root filesystem may be read-only: the model cache and everything written at run time
# live on volumes (the Helm chart mounts /models, /tmp and /dev/shm).
ENV PATH=/opt/mistral-serve/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/mistral \
    XDG_CACHE_HOME=/tmp/cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    MISTRALSERVE_CACHE_DIR=/models
RUN mkdir -p /models && chown 10001:10001 /models
VOLUME ["/models"]

USER 10001:10001
# gRPC, plaintext health (kubelet probes), Prometheus metrics.
EXPOSE 50051 8000 50052 9400
ENTRYPOINT ["mistral-serve"]
CMD ["serve"]
