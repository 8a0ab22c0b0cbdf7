# The training image: the hpctrain package (training/) on a locked, hash-checked dependency set.
#
# Build context: the repository root. The build needs no network: dependencies come from the
# wheelhouse made beforehand on the host by scripts/wheelhouse.sh (from docker/requirements.lock),
# the way air-gapped sites build. Normally built by ImageBuildHook (plugins/slurmflow/hooks/image.py),
# which tags the image by content; by hand:
#
#   scripts/wheelhouse.sh && docker build -f docker/training.Dockerfile \
#       --build-arg BASE_IMAGE=127.0.0.1:5000/slurmflow/base:bookworm -t training:dev .
#
# Layer order is cache order: base -> venv with dependencies (changes with the lock only) ->
# user -> code. A code-only change rebuilds only the last layers (copy + install of hpctrain).
# Plain Dockerfile syntax (no RUN --mount): it builds with BuildKit and with the classic builder
# the Docker API uses, and no `# syntax=` line, whose frontend image would need a hub.

# Any Debian/Ubuntu-style image with python3 >= 3.11 and the venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- dependencies: a venv filled from the wheelhouse only ------------------------------------
FROM ${BASE_IMAGE} AS deps
RUN python3 -m venv /opt/venv
COPY docker/requirements.lock /tmp/deps/requirements.lock
COPY wheelhouse/ /tmp/deps/wheelhouse/
# --require-hashes: a wheel that is not the locked one fails the build instead of slipping in.
# --no-deps + pip check: the lock is complete; check proves it instead of letting pip resolve.
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/deps/wheelhouse \
        --require-hashes --no-deps -r /tmp/deps/requirements.lock \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# --- runtime: only the venv crosses over, the wheels stay in the build stage ------------------
FROM ${BASE_IMAGE}
ARG HPC_UID=1000
# Non-root by default. HPC runtimes (charliecloud, apptainer, enroot, podman keep-id) run as the
# submitting user anyway, and the docker runtime passes --user; this is the fallback identity.
RUN groupadd --gid "${HPC_UID}" hpc \
    && useradd --uid "${HPC_UID}" --gid hpc --create-home --shell /bin/bash hpc
COPY --from=deps /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet
# GIT_PYTHON_REFRESH: MLflow imports GitPython to tag runs with a commit; the image has no git
# (and no .git), which made every job log ~40 "Bad git executable" lines. The commit comes
# from the orchestrator instead (BuildImageOperator's code_version).

# --- code: last, so editing training/ rebuilds only from here ---------------------------------
# training/configs/ is not sent (ImageBuildHook's context, the .dockerignore): experiment configs
# travel with each job (slurmflow.pipeline.experiments), so a config-only change reuses the image.
COPY training/ /opt/hpctrain/
# Built from a scratch copy: setuptools writes build/ and *.egg-info next to the sources.
RUN cp -a /opt/hpctrain /tmp/hpctrain-build \
    && pip install --no-cache-dir --no-index --no-deps --no-build-isolation /tmp/hpctrain-build \
    && rm -rf /tmp/hpctrain-build \
    && python -c "import hpctrain"
USER hpc
WORKDIR /home/hpc
CMD ["python", "-m", "hpctrain", "--help"]
