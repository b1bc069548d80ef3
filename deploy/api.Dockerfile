# syntax=docker/dockerfile:1
# The API / coordinator image: `farm api`, `farm flower`, `farm db upgrade`, `farm keys`, `farm bulk worker`.
# No torch, no diffusers: the base install only (the README's "Deploy" section). Build from the repository root:
#   docker build -f deploy/api.Dockerfile -t lcm-farm-api .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/farm
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY farm ./farm
COPY tasks ./tasks
COPY models ./models
COPY db ./db
COPY migrations ./migrations
# the base install, plus pyarrow (the `bulk` extra's one package that POST /bulk and `farm bulk worker` need)
RUN /opt/farm/bin/pip install --constraint constraints.txt . pyarrow \
 && ! /opt/farm/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --home-dir /home/farm --shell /usr/sbin/nologin farm \
 && mkdir -p /var/lib/farm && chown farm:farm /var/lib/farm
COPY --from=build /opt/farm /opt/farm
ENV PATH=/opt/farm/bin:$PATH PYTHONUNBUFFERED=1 FARM_DATA_DIR=/var/lib/farm FARM_API_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/farm
EXPOSE 8000 5555
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FARM_API_PORT', '8000'), timeout=2)" || exit 1
ENTRYPOINT ["farm"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
