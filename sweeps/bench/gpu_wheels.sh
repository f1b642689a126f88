#!/usr/bin/env bash
# Wheels for a GPU machine that has torch (2.11, CUDA) but no network: run this HERE (with network),
# carry .whl/ over (it is git-ignored), install there without an index. Python 3.12, manylinux x86_64.
#
#   sweeps/bench/gpu_wheels.sh              # what the lent H100/H200 image lacks: pretrain's deps + torchtitan 0.3.0 (~6 MB)
#   sweeps/bench/gpu_wheels.sh pretrain     # only what launch.py needs there
#   sweeps/bench/gpu_wheels.sh bare         # also everything that image has but a bare torch install lacks (~110 MB)
#   PY=3.11 DEST=/tmp/w sweeps/bench/gpu_wheels.sh
#
# Then, on the GPU machine (repository root):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 sweeps/bench/bench_gpu.py
#
# Every wheel is pinned and downloaded without its dependencies (--no-deps), so the lists are the whole
# closure. The default set leaves out what the lent GPU image already has (numpy, pandas, pyarrow,
# requests, pyyaml, tokenizers, sentencepiece, filelock, huggingface-hub, tensorboard, ...): a wheel
# installed into /tmp/site shadows the machine's own copy, and a second numpy or pandas there could
# break what was built against the first. Use `bare` on a machine with nothing but torch. Left out
# everywhere: aim (optional; the benchmarks run with metrics.enable_aim=false), wandb (torchtitan imports
# it only with enable_wandb) and matplotlib (only sweeps/report.py's plot).
set -euo pipefail

WHAT=${1:-all}
PY=${PY:-3.12}
DEST=${DEST:-.whl}
cd "$(dirname "$0")/../.."

# launch.py with data=embedded, float8 and compile: what the GPU image lacks
PRETRAIN=(
    hydra-core==1.3.8 omegaconf==2.3.1
    torchao==0.18.0                   # its cpp extensions need torch >= 2.11
    datasets==4.7.0                   # < 4.8 for torchtitan 0.3.0; pretrain needs >= 3.0
    dill==0.4.0 multiprocess==0.70.18 # datasets' own, pinned by it below the newest
    submitit==1.5.3                   # imported by the launcher's SLURM side; cloudpickle is there
)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # hydra's parser runtime: a source archive only, built here (pure Python)
# torchtitan 0.3.0 for sweeps/bench/bench_gpu.py's comparison (not a dependency of this project)
TORCHTITAN=(
    torchtitan==0.3.0 torchdata==0.11.0 torch-checkpointing==0.1.1 spmd-types==0.2.3
    tyro==0.9.35 docstring-parser==0.17.0 shtab==1.7.2 typeguard==4.4.4
)
# on the GPU image already; needed on a machine that has only torch (torch brings filelock, fsspec,
# jinja2, networkx, sympy, typing_extensions, setuptools, but not numpy)
BARE=(
    numpy==2.3.4 pyarrow==23.0.1 pandas==2.3.3 python-dateutil==2.9.0.post0 pytz==2025.2 tzdata==2025.2 six==1.17.0
    PyYAML==6.0.3 xxhash==3.6.0 tqdm==4.67.1 packaging==25.0 huggingface-hub==0.36.0 hf-xet==1.2.0
    requests==2.32.5 certifi==2025.10.5 charset-normalizer==3.4.4 idna==3.11 urllib3==2.5.0
    httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.11.0 sniffio==1.3.1
    sentencepiece==0.2.1 tokenizers==0.22.1 cloudpickle==3.1.1
    filelock==3.20.0 fsspec==2025.9.0 typing_extensions==4.15.0
    # torchtitan's
    rich==14.2.0 markdown-it-py==4.0.0 mdurl==0.1.2 pygments==2.19.2 safetensors==0.6.2 einops==0.8.1 pillow==12.0.0
    tensorboard==2.20.0 tensorboard-data-server==0.7.2 protobuf==6.33.0 absl-py==2.3.1 grpcio==1.76.0
    markdown==3.9 werkzeug==3.1.3 markupsafe==3.0.3
)

case "$WHAT" in
    all) PACKAGES=("${PRETRAIN[@]}" "${TORCHTITAN[@]}") ;;
    pretrain) PACKAGES=("${PRETRAIN[@]}") ;;
    bare) PACKAGES=("${PRETRAIN[@]}" "${TORCHTITAN[@]}" "${BARE[@]}") ;;
    *) echo "usage: $0 [all|pretrain|bare]" >&2; exit 2 ;;
esac

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    --python-version "$PY" --implementation cp --abi "cp${PY/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${PACKAGES[@]}"
python3 -m pip wheel -q --no-deps -w "$DEST" "${SDIST_ONLY[@]}"

echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
echo "on the GPU machine (repository root):"
echo "  python3 -m pip install -q --no-index --no-deps --target /tmp/site $DEST/*.whl && export PYTHONPATH=/tmp/site"
