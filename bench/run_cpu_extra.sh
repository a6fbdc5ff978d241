#!/usr/bin/env bash
# Follow-up CPU runs for bench/README.md (after bench/run_cpu.sh): batching within 24 GiB, the best
# CPU recipe (bf16 + channels_last) and DiffuseIT text with the full 5-model CLIP ensemble.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-bench/results/cpu.jsonl}
common=(--steps 1 --warmup 1 --threads 1 --clock cpu --repeat 0 --skip-baseline --out "$OUT")
# batching: batch 2 fits in 24 GiB at fp32; batch 4 only with gradient checkpointing (batch 1 as its reference)
$PY -m bench.compare --methods blended,diffuseit-image --batches 2 --dtypes fp32 "${common[@]}"
$PY -m bench.compare --methods blended --batches 1,4 --dtypes fp32 --grad-checkpoint "${common[@]}"
# bf16 + channels_last, batch 1
$PY -m bench.compare --methods blended,diffuseit-image --batches 1 --dtypes bf16 --channels-last "${common[@]}"
$PY -m bench.compare --methods diffuseit-text --clip-models ViT-B-32 --batches 1 --dtypes bf16 --channels-last "${common[@]}"
# DiffuseIT text with upstream's full CLIP ensemble: without checkpointing the CLIP towers it does not fit
$PY -m bench.compare --methods diffuseit-text --batches 1 --dtypes fp32 --ablate clip_checkpoint=1 \
    --steps 1 --warmup 1 --threads 1 --clock cpu --repeat 1 --skip-baseline --out "$OUT" --no-plain
# torch.compile of the UNet (inductor), one ingredient on top of the fast path
$PY -m bench.compare --methods diffuseit-image --batches 1 --dtypes fp32 --ablate compile=1 --no-plain "${common[@]}"
# batch 1 / 4 / 8 within 24 GiB: bf16 body + UNet gradient checkpointing
$PY -m bench.compare --methods blended --batches 1,4,8 --dtypes bf16 --grad-checkpoint "${common[@]}"
