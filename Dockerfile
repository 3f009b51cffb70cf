# megatron-prune on the NeMo Framework container generation it is tested against.
#
# nvcr.io/nvidia/nemo:26.02 (NeMo Framework 26.02) ships Megatron Core 0.16 and Megatron-Bridge 0.3.0, the series
# this package pins (megatron-core>=0.16,<0.17; tested with 0.16.1 and Megatron-Bridge 0.3.1), with Transformer
# Engine 2.12, PyTorch 2.10, CUDA 13.0, ModelOpt 0.41 and the Mamba kernels (mamba_ssm, causal_conv1d). 26.04
# moved to Megatron Core 0.17 / Megatron-Bridge 0.4, which this package does not support yet.
#
#   docker build -t megatron-prune .
#   docker run --gpus all --rm megatron-prune bash scripts/gpu_check.sh        # TE specs + Mamba kernels
#   docker run --gpus all --rm --shm-size 16g -v /models:/models megatron-prune \
#       torchrun --nproc-per-node 8 -m megatron_prune --hf-model /models/Qwen3-8B --target-params 6B --output-dir /models/out
#   docker run --gpus all --rm -v /models:/models megatron-prune launch/distill.sh /models/out/distillation_run_card.yaml ...
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.02
FROM ${NEMO_IMAGE}

ENV PYTHONUNBUFFERED=1
WORKDIR /opt/megatron-prune
COPY . .

# Keep the container's CUDA stack as it is: every package it ships with a plain version is a constraint (torch,
# transformer-engine, megatron-core, megatron-bridge, nvidia-modelopt, mamba-ssm, transformers...), except those the
# nemo-run extra replaces. The package itself goes in without dependencies (the container's megatron-core may carry a
# development version), then the extras' own requirements under those constraints; the build fails if torch moved.
RUN python -m pip freeze --all | grep -E '^[A-Za-z0-9_.-]+==' \
        | grep -viE '^(nemo[-_]run|leptonai|megatron[-_]prune)==' > /tmp/container-constraints.txt \
 && python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; \
print('\n'.join(r for extra in ('bridge', 'nemo-run', 'report') for r in d[extra]))" > /tmp/extras.txt \
 && python -m pip install --no-cache-dir --no-deps -e . \
 && python -m pip install --no-cache-dir -c /tmp/container-constraints.txt -r /tmp/extras.txt \
 && python -c "import torch; print(torch.__version__)" | cmp -s - /tmp/torch-version \
 && python -c "import megatron.core, megatron.bridge, transformer_engine, nemo_run, megatron_prune; \
print('megatron-prune ready: megatron-core', megatron.core.__version__, '| transformer-engine', transformer_engine.__version__)"

CMD ["python", "-m", "megatron_prune", "--help"]
