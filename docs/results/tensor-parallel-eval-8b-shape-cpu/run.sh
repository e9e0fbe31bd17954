#!/bin/bash
# 8B-shape (2 layers, FP8 checkpoint) kvc eval at TP 1, 2, 4 on the CPU.
cd /work/main
for tp in 1 2 4; do
  s=$SECONDS
  /usr/bin/time -v target/release/kvc eval -m /tmp/ck8-fp8 --device cpu --tasks multi_news --limit 2 \
    --methods kvcompress,snapkv --rates 1,4,16 --max-input-tokens 1000 --max-new-tokens 8 --min-cache-tokens 16 \
    --dump-allocation --no-progress --tp $tp --out /tmp/tp8/tp$tp > /tmp/tp8/tp$tp.log 2>&1
  echo "tp $tp rc=$? wall_s=$((SECONDS - s))" >> /tmp/tp8/summary.txt
done
