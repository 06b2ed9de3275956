# GPU image for cloud runs: Composer's own PyTorch 2.7.0 base (CUDA 12.8, Python 3.12), then this package.
#   docker build -t flamingo-composer .
#   docker run --gpus all --ipc=host -v /data:/data flamingo-composer composer train.py yamls/openflamingo-3b.yaml
ARG BASE_IMAGE=mosaicml/pytorch:2.7.0_cu128-python3.12-ubuntu22.04
FROM ${BASE_IMAGE}

WORKDIR /workspace/flamingo_composer
# Dependencies first so code edits do not invalidate the (large) install layer.
COPY pyproject.toml README.md ./
RUN mkdir -p flamingo_composer && touch flamingo_composer/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall -y flamingo_composer
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# DL3064 flags the name (TOKEN...): it is the tokenizers library's thread switch, not a secret.
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false
CMD ["composer", "train.py", "yamls/gpu-smoke.yaml"]
