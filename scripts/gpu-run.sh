#!/usr/bin/env bash
# The benchmarks and GPU tests on the lent H200, in parts that fit the device tool's 10-minute
# calls (run them back to back: the machine, its CUDA build and the models stay while warm;
# each call builds and generates what is missing, so any part can run first).
#   ../shared/device/prepare.sh msgspec==0.22.0 platformdirs==4.14.8   # here, once
#   mkdir -p .device-carry && cp "$(lmxd ...models dir)"/synth-tiny.gguf .device-carry/
#   device run, carry [".device", ".device-carry"]:  bash scripts/gpu-run.sh 1 [2 ...]
# Each call builds llama-cpp-python with CUDA and generates the three shapes if missing (the
# tokenizer comes from synth-tiny, carried: real model files are too large to travel), under
# /tmp, which carried folders do not replace. Parts: 1, the gpu tests, parking, switch latency
# and forks; 2, throughput; 3, density; 4, the memory table and the article's experiment;
# 5, where a step's host time goes (scripts/profile_step.py); 6, the same through the daemon
# (scripts/profile_daemon.py, under py-spy when its wheel is carried); 7, the gpu tests alone
# (their output kept: the cap sweep prints its figures); 8, on two GPUs, `lmxd bench devices`
# and the gpu tests; 9, on two GPUs, scripts/profile_devices.py without py-spy for each
# DEVICES@THREADS of $RUNS; 10, `lmxd bench offload`; 0, the CUDA build packed
# into $OUT, to be carried next time as .device-carry/llama-cuda.tar.xz (a machine that has
# it skips the build). Each part's results land in
# $OUT as a tarball as soon as it ends.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: gpu-run.sh PART..." >&2; exit 2; }
# A CUDA build brought back by an earlier call (part 0) saves the 4-5 minute build.
if [ -f .device-carry/llama-cuda.tar.xz ] && [ ! -d /tmp/site/llama_cpp ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-carry/llama-cuda.tar.xz
fi
source .device/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .device-carry/py_spy-*.whl 2>/dev/null \
  && export PATH=/tmp/pyspy/bin:$PATH
export LMXD_MODELS_DIR=/tmp/lmxd-models
mkdir -p "$LMXD_MODELS_DIR"
cp -n .device-carry/synth-tiny.gguf "$LMXD_MODELS_DIR/" 2>/dev/null
lmxd() { python3 -m lmxd.cli "$@"; }
for s in smollm2-360m qwen2-0.5b llama3.2-1b; do
  [ -f "$LMXD_MODELS_DIR/synth-$s.gguf" ] || lmxd synth "$s" --tokenizer synth-tiny
done
for part in "$@"; do
  out=bench-out/part$part
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
  python3 -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)' >> "$out/gpu.txt"
  case $part in
  1)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
    lmxd bench parking --out "$out" 2>&1 | tee "$out/parking.txt"
    lmxd bench switch --out "$out" 2>&1 | tee "$out/switch.txt"
    lmxd bench forks --out "$out" 2>&1 | tee "$out/forks.txt"
    ;;
  2)
    lmxd bench throughput --out "$out" 2>&1 | tee "$out/throughput.txt"
    ;;
  3)
    lmxd bench density --out "$out" 2>&1 | tee "$out/density.txt"
    ;;
  4)
    lmxd bench memory --model synth-smollm2-360m --model synth-qwen2-0.5b --model synth-llama3.2-1b \
      --n-ctx 4096 --n-ctx 32768 --n-ctx 131072 --n-seq 1 --n-seq 8 --beyond-training \
      --out "$out" 2>&1 | tee "$out/memory.txt"
    lmxd bench article --out "$out" 2>&1 | tee "$out/article.txt"
    ;;
  5)
    python3 scripts/profile_step.py synth-llama3.2-1b 8 64 2>&1 | tee "$out/profile.txt"
    python3 scripts/profile_step.py synth-llama3.2-1b --hot 16 64 2>&1 | tee "$out/profile-hot.txt"
    ;;
  6)
    python3 scripts/profile_daemon.py "$out" synth-llama3.2-1b 8 64 2>&1 | tee "$out/profile-daemon.txt"
    ;;
  7)
    python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
    ;;
  8)  # two GPUs (nvidia-h200-x2): placement, one GPU against two, then the gpu tests there
    lmxd bench devices --out "$out" 2>&1 | tee "$out/devices.txt"
    python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
    ;;
  9)  # two GPUs: the devices profile without py-spy, for each DEVICES@THREADS in $RUNS
    NO_SPY=1 python3 scripts/profile_devices.py "$out" $RUNS 2>&1 | tee "$out/threads.txt"
    ;;
  10)  # partial offload
    lmxd bench offload --out "$out" 2>&1 | tee "$out/offload.txt"
    ;;
  0)  # the CUDA build for .device-carry/llama-cuda.tar.xz (cat the parts): pip copied each
      # library's symlinks as files, three copies of 43 MB; links again, it packs to 22 MB
    rm -rf /tmp/pack && mkdir /tmp/pack && cp -a /tmp/site/llama_cpp /tmp/site/llama_cpp_python-*.dist-info /tmp/pack/
    (cd /tmp/pack/llama_cpp/lib && for f in *.so *.so.*; do
       full=$(ls "${f%%.so*}".so.*.* 2>/dev/null | head -1)
       [ -n "$full" ] && [ "$f" != "$full" ] && cmp -s "$f" "$full" && ln -sf "$full" "$f"
     done)
    tar -C /tmp/pack -cf - . | xz -T0 -9 | split -b 15M - "$OUT/llama-cuda.tar.xz.part-"
    continue
    ;;
  esac
  tar czf "$OUT/gpu-part$part.tar.gz" "$out"
done
