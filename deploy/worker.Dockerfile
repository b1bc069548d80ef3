# syntax=docker/dockerfile:1
# The worker image: `farm worker --model M --device cuda:0`, one container per GPU.
# torch 2.13.0 from PyTorch's CUDA 12 wheel index (the CUDA runtime comes with the wheels; the host needs the NVIDIA
# driver and the NVIDIA Container Toolkit), diffusers and the rest of the `worker` extra. Model weights are NOT in
# the image: mount them at /models (FARM_MODEL_DIR) or mount a Hugging Face cache at /home/farm/.cache/huggingface.
# Build from the repository root:
#   docker build -f deploy/worker.Dockerfile -t lcm-farm-worker .
#   docker build -f deploy/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t lcm-farm-worker:cpu .          # the CPU build (the Compose `cpu` profile, farm/tiny-lcm on a laptop)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/farm
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY farm ./farm
COPY tasks ./tasks
COPY models ./models
COPY db ./db
COPY migrations ./migrations
# torch first, from the chosen index (its CUDA 12 build); the constraints keep it at 2.13.0
RUN /opt/farm/bin/pip install --constraint constraints.txt --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && /opt/farm/bin/pip install --constraint constraints.txt '.[worker]' \
 && /opt/farm/bin/python -c "import torch, diffusers; assert torch.__version__.startswith('2.13.0'), torch.__version__"

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --home-dir /home/farm --shell /usr/sbin/nologin farm \
 && mkdir -p /var/lib/farm /models && chown farm:farm /var/lib/farm
COPY --from=build /opt/farm /opt/farm
ENV PATH=/opt/farm/bin:$PATH PYTHONUNBUFFERED=1 FARM_DATA_DIR=/var/lib/farm FARM_MODEL_DIR=/models \
    HF_HUB_OFFLINE=1 HF_HOME=/home/farm/.cache/huggingface
USER 10001:10001
WORKDIR /var/lib/farm
VOLUME ["/models"]
# worker metrics (FARM_METRICS_PORT, default 9808; one worker per container, so the port is free)
EXPOSE 9808
# SIGTERM to the main process starts Celery's warm shutdown: the batch in hand is finished and stored
STOPSIGNAL SIGTERM
ENTRYPOINT ["farm", "worker"]
CMD ["--model", "farm/tiny-lcm", "--device", "cpu"]
