# saelab on a CUDA machine: `docker build -t saelab .` then
# `docker run --gpus all -v $PWD/outputs:/work/outputs saelab train sae=topk sae.k=32`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline

WORKDIR /opt/saelab
# Dependencies first (cached layer); the base image's CUDA torch satisfies torch>=2.4, so pip keeps it.
COPY pyproject.toml README.md ./
COPY saelab ./saelab
COPY hydra_plugins ./hydra_plugins
RUN pip install --no-cache-dir ".[slurm]"

COPY scripts ./scripts
WORKDIR /work
ENTRYPOINT ["saelab"]
CMD ["train"]
