#!/usr/bin/env bash
# The benchmarks and GPU tests on the lent H200, in three parts that fit the device tool's
# 10-minute calls (run them back to back: the machine, its CUDA build and the models stay while
# warm; each part builds and generates what is missing, so any part can run first).
#   ../shared/device/prepare.sh msgspec==0.22.0 platformdirs==4.14.8   # here, once
#   mkdir -p .device-carry && cp "$(lmxd ...models dir)"/synth-tiny.gguf .device-carry/
#   device run, carry [".device", ".device-carry"]:  bash scripts/gpu-run.sh 1   (then 2, then 3)
# Each part builds llama-cpp-python with CUDA and generates the three shapes if missing (the
# tokenizer comes from synth-tiny, carried: real model files are too large to travel); part 1
# runs the gpu tests; part 2 the memory table, the article's experiment and parking; part 3
# throughput and switch latency. Results land in $OUT as a tarball.
set -uo pipefail
part=${1:?part 1, 2 or 3}
source .device/setup.sh || exit 1
export LMXD_MODELS_DIR=$PWD/.device-models
mkdir -p "$LMXD_MODELS_DIR" bench-out
cp -n .device-carry/synth-tiny.gguf "$LMXD_MODELS_DIR/" 2>/dev/null
lmxd() { python3 -m lmxd.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee bench-out/gpu.txt
python3 -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)' | tee -a bench-out/gpu.txt
for s in smollm2-360m qwen2-0.5b llama3.2-1b; do
  [ -f "$LMXD_MODELS_DIR/synth-$s.gguf" ] || lmxd synth "$s" --tokenizer synth-tiny
done
case $part in
1)
  ls -la "$LMXD_MODELS_DIR"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee bench-out/gpu-tests.txt
  ;;
2)
  lmxd bench memory --model synth-smollm2-360m --model synth-qwen2-0.5b --model synth-llama3.2-1b \
    --n-ctx 4096 --n-ctx 32768 --n-ctx 131072 --n-seq 1 --n-seq 8 --beyond-training \
    --out bench-out 2>&1 | tee bench-out/memory.txt
  lmxd bench article --out bench-out 2>&1 | tee bench-out/article.txt
  lmxd bench parking --out bench-out 2>&1 | tee bench-out/parking.txt
  ;;
3)
  lmxd bench throughput --out bench-out 2>&1 | tee bench-out/throughput.txt
  lmxd bench switch --out bench-out 2>&1 | tee bench-out/switch.txt
  ;;
esac
tar czf "$OUT/gpu-part$part.tar.gz" bench-out
