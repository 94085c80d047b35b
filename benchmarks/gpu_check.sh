#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and no internet, build a GPT-2-small-shaped checkpoint
# (random weights) and a tokenizer locally, run both notebooks on CUDA in fp16 (forced, as a T4 runs them)
# and in bf16 with small step counts, run the benchmark on CUDA, and print seconds per step, tokens per
# second, peak memory and skipped gradient-scaler steps. About 8 minutes at most; see benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh                                # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --size tiny       # the same code on a tiny GPT-2, on a CPU
#   bash benchmarks/gpu_check.sh --dry-run                      # check every knob, build and run nothing
#   bash benchmarks/gpu_check.sh --help                         # every option
#
# Everything is written under runs/gpu_check/ (git-ignored); the summary is runs/gpu_check/gpu_check.json.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
if [[ " $* " != *" --device cpu "* && " $* " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python3 "$(dirname "$0")/gpu_check.py" "$@"  # from the caller's folder: a relative --work is relative to it
