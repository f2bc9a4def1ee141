#!/usr/bin/env bash
# The GPU checks of issues 2-5, as one script for a session that is lent a device machine.
# First run on 2026-11-30 (NVIDIA H200): stage 1 and the DPO bench; figures in
# bench/results/*_gpu.json, *_h200.json and docs/benchmarks.md ("First GPU figures").
#
# Prepare here once (the device image has torch 2.11, transformers 5.17, peft, accelerate, but no
# diffusers, trl, deepspeed or datasets; its transformers lacks SubConfigSpec (>= 5.20) and its
# huggingface_hub is older than 2.x, which needs httpx2: carry transformers, not the hub;
# ../shared does not travel):
#   printf '/.whl/\n/.gpuref/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 safetensors==0.8.0 \
#       transformers==5.24.0 trl==1.16.0 \
#       bitsandbytes          # 8-bit AdamW for the GRPO memory variant (skipped without it)
#   python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8 trl==1.16.0
#   mkdir -p .gpuref && cp ../shared/bench-reference/gpu_anchors.py .gpuref/
# Then: run(command="bash bench/gpu.sh 1", carry=[".whl", ".gpuref"], timeout_s=570), and
#       "bash bench/gpu.sh 2" for the training benches, "bash bench/gpu.sh 3" for Flow-GRPO on an
#       SD3.5-M-shaped pipeline (checked here only at a toy size: bench/grpo.py --gpu --toy), if
#       device time is left.
set -uo pipefail
stage=${1:-1}
touch /tmp/gpu_start
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | grep -v -i "warn" | tail -40; }
if [ "$stage" = 1 ]; then
    run 180 python3 bench/gpu_checks.py "$out"                            # fp16 scaler, async reward
    run 150 python3 .gpuref/gpu_anchors.py "$out/gpu_anchors.json"      # the baseline, same call
    run 120 python3 bench/score.py --gpu                                  # target >= 110 images/s
elif [ "$stage" = 4 ]; then
    run 200 python3 bench/score.py --gpu --compile
elif [ "$stage" = 3 ]; then
    run 420 python3 bench/grpo.py --gpu --samples 16 --train_batch 4      # peak GiB: memory < 24
else
    run 240 python3 bench/ddpo.py --gpu --compile --samples 256           # >= 5.5 img/s, <= 180 s
    run 120 python3 bench/dpo.py                                          # >= 30 pairs/s
    run 120 python3 bench/draft.py
    run 120 python3 bench/train_reward.py
fi
# only what this call wrote (at most 8 files come back)
find bench/results docs/benchmarks.md -newer /tmp/gpu_start -type f -exec cp {} "$out/" \; 2>/dev/null || true
