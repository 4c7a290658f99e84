# The spatial_assets code location image (user code deployment of the Dagster Helm chart, or the
# ECS task image). It serves `dagster api grpc -m spatial_assets.definitions`; the run and step
# pods/tasks Dagster launches use the same image (DAGSTER_CURRENT_IMAGE, set by the chart).
#   docker build -t registry.example.org/spatial-assets:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    OMP_WAIT_POLICY=PASSIVE \
    DAGSTER_HOME=/opt/dagster/dagster_home

# libgomp for scikit-learn / torch, libgl/glib for the imaging stack (opencv via sopa)
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/spatial_assets

# torch first and from the CPU index, so nothing pulls the CUDA wheels (same pin as constraints.txt)
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

# dependencies before the source, so a code change does not reinstall them
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir spatial_assets && touch spatial_assets/__init__.py \
    && pip install -c constraints.txt ".[novae,rctd,prod]" \
    && pip uninstall -y spatial_assets && rm -rf spatial_assets

COPY spatial_assets ./spatial_assets
RUN pip install --no-deps -c constraints.txt ".[novae,rctd,prod]" \
    && useradd --create-home --uid 1000 dagster \
    && mkdir -p "$DAGSTER_HOME" && chown -R dagster "$DAGSTER_HOME"

USER dagster
EXPOSE 3030
# the chart passes `dagster api grpc -m spatial_assets.definitions -h 0.0.0.0 -p 3030`; this default
# is for running the image by hand
CMD ["dagster", "api", "grpc", "-m", "spatial_assets.definitions", "-h", "0.0.0.0", "-p", "3030"]
