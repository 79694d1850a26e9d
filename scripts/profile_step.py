"""Where a decode step's host time goes: the engine's stepper alone, under cProfile.

    python scripts/profile_step.py [MODEL] [--hot] [SEQUENCES ...]   (synth-llama3.2-1b 64)

For each batch size: ``llama_decode`` alone (the throughput benchmark's reference), the stepper
without the profiler (greedy, or with ``--hot`` the throughput benchmark's temperature 0.8 /
top-k 40 / top-p 0.95; slices of 16 steps, as the daemon runs it), then the same under
cProfile with the functions that took the most time of their own. The gap between the first
two is the host work per step that the daemon adds; the profile says where it is.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from lmxd import catalog
from lmxd.bench.throughput import HOT, N_CTX, PROMPT, TOKENS, reference
from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.engine.sampling import SamplingParams
from lmxd.engine.stepper import ReplySpec, SliceControl, Stepper


def stepper_rate(
    path: object, n_seq: int, profile: cProfile.Profile | None, sampling: SamplingParams
) -> float:
    engine = Engine.get()

    def measure() -> float:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        ctx = Context(model, ContextParams(n_ctx=N_CTX, n_seq_max=n_seq))
        stepper = Stepper(ctx)
        try:
            prompt = model.tokenize(PROMPT)
            spec = ReplySpec(TOKENS, sampling)
            for seq in range(n_seq):
                stepper.start(seq, prompt, spec)
            seqs = list(range(n_seq))
            stepper.run(seqs, 2, SliceControl(), lambda _: None)  # prefill, not timed
            if profile is not None:
                profile.enable()
            t0, tokens, live = time.perf_counter(), 0, set(seqs)
            while live:
                reports = stepper.run(sorted(live), 16, SliceControl(), lambda _: None)
                for seq, report in reports.items():
                    tokens += len(report.generated)
                    if report.reply is not None:
                        live.discard(seq)
            elapsed = time.perf_counter() - t0
            if profile is not None:
                profile.disable()
            return tokens / elapsed
        finally:
            ctx.free()
            registry.release(model)

    return engine.call(measure)


def main() -> None:
    args = sys.argv[1:]
    hot = "--hot" in args
    args = [a for a in args if a != "--hot"]
    model = args[0] if args else "synth-llama3.2-1b"
    counts = [int(n) for n in args[1:]] or [64]
    sampling = SamplingParams(**HOT) if hot else SamplingParams()
    path = catalog.resolve_model(model, catalog.models_dir())
    for n in counts:
        alone = reference(path, n)
        plain = stepper_rate(path, n, None, sampling)
        profile = cProfile.Profile()
        profiled = stepper_rate(path, n, profile, sampling)
        print(
            f"\n== {model}, {n} sequences, {'hot' if hot else 'greedy'}: llama_decode alone "
            f"{alone:,.0f} tok/s; stepper {plain:,.0f} tok/s ({100 * plain / alone:.1f}%); "
            f"under cProfile {profiled:,.0f}"
        )
        pstats.Stats(profile).sort_stats("tottime").print_stats(24)


if __name__ == "__main__":
    main()
