"""`lmxd demo`: the main job of a fresh checkout (``make demo``)."""

from __future__ import annotations

from pathlib import Path

import click

from lmxd import catalog
from lmxd.cli import console, main
from lmxd.cli.models import estimate_table, models, models_dir_option


@main.command()
@models_dir_option
@click.pass_context
def demo(ctx: click.Context, models_dir: Path | None) -> None:
    """Show the model catalog and one real generation with its memory figures."""
    from lmxd.engine.context import Context, ContextParams
    from lmxd.engine.generate import generate
    from lmxd.engine.measure import measure_allocation
    from lmxd.engine.model import ChatMessage, ModelRegistry
    from lmxd.engine.runtime import Engine
    from lmxd.engine.sampling import SamplingParams
    from lmxd.memory.estimator import estimate
    from lmxd.modelfile import read_model_info

    ctx.invoke(models, models_dir=models_dir)
    path = catalog.resolve_model("smollm2-135m", catalog.models_dir(models_dir))
    n_ctx = 4096
    est = estimate(read_model_info(path), n_ctx)
    buffers = measure_allocation(path, n_ctx)
    measured = buffers.parts(device_only=False)
    measured["total"] = sum(measured.values())
    console.print(estimate_table(f"SmolLM2-135M-Instruct, n_ctx={n_ctx}", est, measured))

    engine = Engine.get()
    question = "Write a Python function that checks whether a string is a palindrome."
    console.print(f"[bold]user:[/] {question}\n[bold]assistant:[/] ", end="")

    def run() -> None:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        context = Context(model, ContextParams(n_ctx=n_ctx))
        try:
            prompt = model.apply_chat_template([ChatMessage("user", question)])
            result = generate(
                context, 0, model.tokenize(prompt, add_special=False), 200, SamplingParams(),
                on_text=lambda text: console.print(text, end="", markup=False),
            )  # fmt: skip
        finally:
            context.free()
            registry.release(model)
        console.print(
            f"\n\n{result.prompt_tokens} prompt tokens in {result.prefill_s * 1000:.0f} ms, "
            f"{result.generated_tokens} generated at "
            f"{result.generated_tokens / result.decode_s:.1f} tokens/s "
            f"(stop: {result.stop_reason.value})"
        )

    engine.call(run)
