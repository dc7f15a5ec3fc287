# adamscope service image: PyTorch's CUDA runtime image plus the project.
#
#   docker build -t adamscope .
#   docker run --gpus all -p 8470-8477:8470-8477 -v adamscope-data:/data \
#       -v "$PWD/tokens.toml:/run/secrets/adamscope-tokens.toml:ro" \
#       -e ADAMSCOPE_TOKENS_FILE=/run/secrets/adamscope-tokens.toml adamscope
#
# One worker process per visible GPU (`--per-gpu`): GPU i is served on port 8470 + i with its
# data under /data/worker<i>; without a GPU a single CPU worker serves port 8470.
#
# Access tokens: the service listens on 0.0.0.0 inside the container, so it needs bearer
# tokens and refuses to start without them. Give them as a JSON or TOML file
# (ADAMSCOPE_TOKENS_FILE, as above) or as JSON in ADAMSCOPE_TOKENS; each entry is
# {"token", "scope": "read"|"write"|"admin", "prefix"?, "name"?}. Only on a network you
# trust completely, ADAMSCOPE_INSECURE_NO_AUTH=1 serves without tokens (everyone is admin).

# Pinned: the torch build (and so the numerics) of the image is part of what a stepper runs.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    ADAMSCOPE_PORT=8470

WORKDIR /opt/adamscope
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client

# The project only asks for torch>=2.4: constrain torch to the version the image ships so pip
# can never swap the CUDA build for another one, and fail the build if it would have to.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
    && pip install --no-cache-dir --constraint /tmp/keep-torch.txt . \
    && python -c "import torch, adamscope.service.app; assert torch.version.cuda, 'torch lost CUDA'" \
    && rm -rf /tmp/keep-torch.txt build ./*.egg-info

# An unprivileged user with a numeric id (so `USER` needs no passwd lookup on the host side).
RUN groupadd --gid 10001 adamscope \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin adamscope \
    && mkdir -p /data \
    && chown 10001:10001 /data

USER 10001:10001
WORKDIR /home/adamscope
VOLUME ["/data"]
# 8470 + one per GPU; publish as many as the host has GPUs.
EXPOSE 8470-8477

# Healthy when every worker answers /healthz (one per visible GPU, at least one).
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request, torch; base = int(os.environ.get('ADAMSCOPE_PORT', '8470')); [urllib.request.urlopen(f'http://127.0.0.1:{base + i}/healthz', timeout=5).close() for i in range(max(torch.cuda.device_count(), 1))]"]

CMD ["adamscope", "serve", "--per-gpu", "--host", "0.0.0.0", "--data-dir", "/data"]
