"""What llama.cpp allocates, and NVML sees, for the Llama-3.2-1B shape with some layers on the
GPU: the estimator's check for partial offload, with op_offload on and off.

    python scripts/measure_offload.py N_GPU_LAYERS...      (e.g. 0 8 14 16 17)

For each count and op_offload setting: a model and one context of 8,192 cells, a prefill of
4,000 tokens in batches of 512; prints the buffers llama.cpp reported (device and host), the
estimator's figures, the prefill's tokens/s, and NVML's peak for this process.
"""

from __future__ import annotations

import os
import sys
import time

import llama_cpp

from lmxd import catalog
from lmxd.bench.gpu import PeakSampler
from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.memory.estimator import Backend, estimate
from lmxd.modelfile import read_model_info

PROMPT = "".join(f" {i}," for i in range(1, 1400))
MiB = 2**20


def main() -> None:
    path = catalog.resolve_model("synth-llama3.2-1b", catalog.models_dir())
    info = read_model_info(path)
    engine = Engine.get()
    registry = ModelRegistry(engine)
    for k in map(int, sys.argv[1:]):
        for offload in (True, False):

            def work(k: int = k, offload: bool = offload) -> float:
                model = registry.acquire(path, k)
                ctx = Context(model, ContextParams(n_ctx=8192, op_offload=offload))
                tokens = model.tokenize(PROMPT)[:4000]
                t0 = time.perf_counter()
                for i in range(0, len(tokens), 512):
                    chunk = tokens[i : i + 512]
                    want = [0] * (len(chunk) - 1) + [1]
                    ctx.decode([0] * len(chunk), chunk, list(range(i, i + len(chunk))), want)
                    llama_cpp.llama_get_logits(ctx.ptr)
                rate = len(tokens) / (time.perf_counter() - t0)
                ctx.free()
                registry.release(model)
                return rate

            with PeakSampler(os.getpid()) as sampler:
                rate, measured = engine.measure(work)
            est = estimate(info, 8192, backend=Backend.CUDA, n_gpu_layers=k, op_offload=offload)
            device = {n: v / MiB for n, v in measured.parts(device_only=True).items()}
            every = {n: v / MiB for n, v in measured.parts(device_only=False).items()}
            print(
                f"k={k} op_offload={offload}: prefill {rate:,.0f} tok/s; NVML peak "
                f"{sampler.peak / MiB:,.0f} MiB; llama.cpp device "
                + ", ".join(f"{n} {v:,.1f}" for n, v in device.items())
                + "; host "
                + ", ".join(f"{n} {every[n] - device[n]:,.1f}" for n in every)
                + f"; estimate device weights {est.weights / MiB:,.1f} kv {est.kv / MiB:,.1f} "
                f"compute {est.compute / MiB:,.1f}, host weights {est.weights_host / MiB:,.1f} "
                f"kv {est.kv_host / MiB:,.1f} compute {est.compute_host / MiB:,.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
