#!/bin/sh
# The speed table of issue #3: every optimizer on GPT-2 small's shapes, float32 / bfloat16 /
# int8 state, with torch's foreach and fused versions for comparison. --scale 0.25 keeps a
# full run near ten minutes on 2 cores; use --scale 1 for the real 124M parameters.
exec python -m adamkit.bench.speed --shapes gpt2 --scale "${SCALE:-0.25}" --steps 7 --warmup 2 \
    --state-dtype float32,bfloat16,int8 --compare --json "${1:-speed_gpt2.json}"
