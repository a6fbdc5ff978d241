#!/usr/bin/env bash
# The CPU runs behind bench/README.md, one after another (each row is its own process).
# The machine they ran on was shared with other jobs, so they use one thread and the process's CPU
# time (--threads 1 --clock cpu); on a quiet machine drop those two flags for wall-clock numbers.
# Usage: bench/run_cpu.sh [results.jsonl]   -- progress on stderr, tables on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-bench/results/cpu.jsonl}
common=(--steps 1 --warmup 1 --threads 1 --clock cpu --out "$OUT")
# 1. fast vs official structure, batch 1, fp32 and bf16 (DiffuseIT text with CLIP ViT-B-32 only: see README)
$PY -m bench.compare --methods diffuseit-image,blended --batches 1 --dtypes fp32,bf16 --repeat 1 "${common[@]}"
$PY -m bench.compare --methods diffuseit-text --clip-models ViT-B-32 --batches 1 --dtypes fp32,bf16 --repeat 1 "${common[@]}"
# 2. one ingredient of the official structure switched back at a time (DiffuseIT image, fp32, batch 1)
$PY -m bench.compare --methods diffuseit-image --batches 1 --dtypes fp32 --repeat 0 --skip-baseline \
    --ablate two_forwards=1 --ablate recompute_source=1 --ablate sdpa=0 --ablate grad_checkpoint=1 \
    --ablate dino_sdpa=1 --ablate channels_last=1 "${common[@]}"
# 3. batching: batch 4 (step timings only)
$PY -m bench.compare --methods blended,diffuseit-image --batches 4 --dtypes fp32 --repeat 0 --skip-baseline "${common[@]}"
