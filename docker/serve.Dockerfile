# `peftvlm serve` in a container (CPU PyTorch; for a GPU start FROM a CUDA PyTorch image and drop
# the CPU index). Build from the repository root, mount a run folder (or a merged export) at /run:
#
#   docker build -f docker/serve.Dockerfile -t peftvlm-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/quickstart:/run:ro" -e PEFTVLM_API_KEY=change-me peftvlm-serve
#
# Kubernetes: the same image; readiness/liveness probe GET /health on port 8000; the key from a
# Secret as the env var PEFTVLM_API_KEY; the run folder from a read-only volume.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PEFTVLM_CACHE=/cache HF_HOME=/cache/huggingface
WORKDIR /app
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY peftvlm ./peftvlm
RUN pip install ".[serve]"

# Not root; the cache (built-in tiny models, Hub downloads of a run's base model) is writable.
RUN useradd --create-home --uid 1000 peftvlm && mkdir -p /cache && chown peftvlm /cache
USER peftvlm
EXPOSE 8000
# 0.0.0.0 inside the container only: publish the port deliberately (-p / a Service).
ENTRYPOINT ["peftvlm", "serve", "/run", "--host", "0.0.0.0", "--port", "8000"]
