# The image the KubeRay template runs (`piflow template kuberay CONFIG --image REGISTRY/piflow:TAG`): Ray's GPU
# image of the Ray version piflow pins (KubeRay's rayVersion must match it), with this checkout installed.
#   docker build -t REGISTRY/piflow:TAG . && docker push REGISTRY/piflow:TAG
# No credentials are baked in: HF_TOKEN, WANDB_API_KEY and AWS_* come from a Kubernetes Secret at run time
# (.dockerignore keeps .env files, keys and cloud credentials of the working dir out of the build context).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /opt/piflow
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users trainer ./trainer
COPY --chown=ray:users models ./models
COPY --chown=ray:users data_pipeline ./data_pipeline
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users assets ./assets
# torch from PyPI is the CUDA build on Linux x86_64 (the CPU-only pin of the test machines is an index choice)
RUN pip install --no-cache-dir . && piflow --help > /dev/null

ENV PYTHONUNBUFFERED=1
