"""On a real GPU (skipped elsewhere): greedy output identical with forced parks, the cap never
crossed, every ledger byte released, the HTTP front's grammars beside CUDA decoding. Needs the
synthetic shapes in the models directory (`lmxd synth qwen2-0.5b`, `lmxd synth llama3.2-1b`):
real model files cannot travel there."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import Daemon, Wire

from lmxd import catalog
from lmxd.bench.gpu import PeakSampler
from lmxd.memory.device import probe_device, probe_devices

MODELS = ("synth-qwen2-0.5b", "synth-llama3.2-1b")


def _gpu_ready() -> bool:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload() or probe_device().kind != "cuda":
        return False
    return all((catalog.models_dir() / f"{m}.gguf").is_file() for m in MODELS)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_ready(), reason="needs a GPU, a CUDA build and synth models"),
]


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    yield d
    assert d.stop() == 0, d.log()


def _turns(w: Wire, agents: list[str]) -> list[str]:
    texts = []
    for turn in range(3):
        for agent in agents:
            r = w.ok("DECODE", agent=agent, prompt=f" turn {turn} of {agent}:", max_tokens=24)
            texts.append(r["text"])
    return texts


def test_greedy_identical_with_forced_parks_on_the_gpu() -> None:
    # One agent per model, so that both runs compute over pools of the same shape: on the GPU,
    # attention over a differently sized pool sums in another order, and random weights
    # (near-tied logits) can then flip a greedy token even without any park.
    runs = []
    for args in ([], ["--park-after-decode"]):
        d = Daemon(*args)
        try:
            w = d.wire()
            for i, model in enumerate(MODELS):
                w.ok("REGISTER", agent=f"a{i}", model=model, n_ctx=2048)
            runs.append(_turns(w, [f"a{i}" for i in range(len(MODELS))]))
            assert w.ok("STATUS")["transfers"]["restores"] > (0 if args else -1)
        finally:
            assert d.stop() == 0, d.log()
    assert runs[0] == runs[1]


def test_two_agents_per_model_decode_alike_resident_together_or_parked() -> None:
    """Each sequence has a KV stream of its own: an agent's greedy text does not depend on
    which other agents of its model are resident beside it (one DECODE at a time)."""
    runs = []
    agents = [f"a{i}" for i in range(2 * len(MODELS))]
    for args in ([], ["--park-after-decode"]):
        d = Daemon(*args)
        try:
            w = d.wire()
            for i, agent in enumerate(agents):
                w.ok("REGISTER", agent=agent, model=MODELS[i % len(MODELS)], n_ctx=2048)
            runs.append(_turns(w, agents))
        finally:
            assert d.stop() == 0, d.log()
    assert runs[0] == runs[1]


def test_spilled_agents_go_on_exactly_on_the_gpu_and_after_a_kill(tmp_path: Path) -> None:
    """Four agents take turns on one sequence under a park budget for about two of their
    states: the others go to disk from page-locked buffers, and come back through ordinary
    memory, with the greedy text of a daemon with room to spare; after a kill -9 the
    spilled ones go on from their files."""
    agents, prompt = ["a", "b", "c", "d"], " and then" * 60

    def rounds(w: Wire, which: range) -> list[str]:
        return [
            w.ok("DECODE", agent=a, prompt=f"{prompt} {r}", max_tokens=16)["text"]
            for r in which
            for a in agents
        ]

    runs, state = [], tmp_path / "state"
    for args in ([], ["--park-budget", "24MiB", "--park-dir", str(state)]):
        d = Daemon("--max-seqs", "1", *args)
        try:
            w = d.wire()
            for agent in agents:
                w.ok("REGISTER", agent=agent, model="synth-llama3.2-1b", n_ctx=2048)
            runs.append(rounds(w, range(3)))
            time.sleep(0.5)  # idle: parked states spill to three quarters of the budget
            transfers = w.ok("STATUS")["transfers"]
            listed = {a["agent"]: a["state"] for a in w.ok("LIST")["agents"]}
        finally:
            if args:
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait(30)
            else:
                runs.append(rounds(d.wire(), range(3, 4)))
                assert d.stop() == 0, d.log()
    assert runs[2] == runs[0]
    assert transfers["spills"] > 0 and transfers["disk_reads"] > 0, transfers
    spilled = {a for a, s in listed.items() if s == "spilled"}
    print(
        f"spills {transfers['spills']}: {transfers['spill_bytes'] / transfers['spill_s'] / 1e9:.2f}"
        f" GB/s; reads back {transfers['disk_reads']}: "
        f"{transfers['disk_read_bytes'] / transfers['disk_read_s'] / 1e9:.2f} GB/s; "
        f"spilled at the kill: {sorted(spilled)}"
    )
    d = Daemon("--max-seqs", "1", "--park-budget", "24MiB", "--park-dir", str(state))
    try:
        w = d.wire()
        after = {a["agent"]: a["state"] for a in w.ok("LIST")["agents"]}
        assert {a for a, s in after.items() if s == "spilled"} == spilled
        assert rounds(w, range(3, 4)) == runs[1]
    finally:
        assert d.stop() == 0, d.log()


def test_the_cap_is_never_crossed() -> None:
    d = Daemon("--vram-limit", "2560MiB")  # both models' weights fit, not both contexts
    try:
        w = d.wire()
        with PeakSampler(d.pid) as sampler:
            for i, model in enumerate(MODELS * 2):
                w.ok("REGISTER", agent=f"a{i}", model=model, n_ctx=8192)
            ids = [
                w.send("DECODE", agent=f"a{i}", prompt=" hello" * 500, max_tokens=64)
                for i in range(4)
            ]
            replies = [w.recv() for _ in ids]
            cap = w.ok("STATUS")["ledger"]["cap"]
        assert all(r["ok"] for r in replies), replies
        assert sampler.available and sampler.samples > 10
        assert 0 < sampler.peak < cap, (sampler.peak, cap)
    finally:
        assert d.stop() == 0, d.log()


THREE = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")


@pytest.mark.skipif(
    not (catalog.models_dir() / f"{THREE[0]}.gguf").is_file(), reason="needs synth-smollm2-360m"
)
@pytest.mark.parametrize("limit", ["2GiB", "3GiB", "4GiB", "6GiB", "8GiB"])
def test_the_cap_holds_at_every_vram_limit(limit: str) -> None:
    """Three models, as many agents as the ledger admits (up to 12), all decoding at once
    with two sequences per model (so they park): NVML's peak for the daemon never reaches the
    cap, and STATUS shows the reconciliation (the device's figure, and what it holds beyond
    the reservations)."""
    d = Daemon("--vram-limit", limit, "--max-seqs", "2")
    try:
        w = d.wire()
        with PeakSampler(d.pid) as sampler:
            agents = []
            for i in range(12):
                r = w.call("REGISTER", agent=f"a{i}", model=THREE[i % 3], n_ctx=4096)
                if not r["ok"]:
                    assert r["error"]["code"] == "VRAM_LEDGER_DENY", r
                    continue
                agents.append(f"a{i}")
            ids = [w.send("DECODE", agent=a, prompt=" hello" * 300, max_tokens=48) for a in agents]
            replies = [w.recv() for _ in ids]
            status = w.ok("STATUS")
        ledger = status["ledger"]
        print(
            f"\nsweep {limit}: cap {ledger['cap']} agents {len(agents)} "
            f"served {sum(r['ok'] for r in replies)} parks {status['transfers']['parks']} "
            f"NVML peak {sampler.peak} device_measured {ledger['device_measured']} "
            f"unaccounted {ledger['unaccounted']} reserved {ledger['reserved']}"
        )
        assert agents, "no agent admitted"
        for r in replies:  # served, or refused for room with the numbers
            assert r["ok"] or r["error"]["code"] in ("VRAM_LEDGER_DENY", "PARK_BUDGET_EXCEEDED"), r
        assert sampler.available and sampler.samples > 10
        assert ledger["device_measured"] > 0 and ledger["unaccounted"] >= 0
        assert 0 < sampler.peak < ledger["cap"], (sampler.peak, ledger["cap"])
    finally:
        assert d.stop() == 0, d.log()


def test_unregister_releases_every_ledger_byte_and_the_card_follows(daemon: Daemon) -> None:
    w = daemon.wire()
    baseline = w.ok("STATUS")
    for i, model in enumerate(MODELS):
        w.ok("REGISTER", agent=f"a{i}", model=model, n_ctx=4096)
        w.ok("DECODE", agent=f"a{i}", prompt=" hello" * 100, max_tokens=8)
    loaded = w.ok("STATUS")
    assert loaded["ledger"]["reserved"] > baseline["ledger"]["reserved"]
    for i in range(len(MODELS)):
        w.ok("UNREGISTER", agent=f"a{i}")
    time.sleep(1)  # let the driver settle after the frees
    after = w.ok("STATUS")

    # only the backend's reservation is left (and what the device holds beyond it)
    def reservations(status: dict[str, Any]) -> int:
        ledger = status["ledger"]
        return int(ledger["reserved"] - ledger["unaccounted"])

    assert reservations(after) == reservations(baseline)
    assert set(after["ledger"]["by_owner"]) <= {"backend", "unaccounted"}
    used_loaded = loaded["device"]["process_used"]
    used_after = after["device"]["process_used"]
    # the weights and contexts are gone from the card, not only from the ledger
    assert (
        used_after < used_loaded - (loaded["ledger"]["reserved"] - after["ledger"]["reserved"]) // 2
    )


def test_the_http_front_streams_tools_and_schemas_on_the_gpu() -> None:
    """The OpenAI API on a CUDA build: grammar-constrained sampling runs beside CUDA decoding
    (random weights: only the constraints, not the words, can be checked)."""
    import httpx
    import jsonschema

    d = Daemon(http=True)
    try:
        url = d.http_url + "/v1"
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        model = MODELS[0]
        with httpx.stream(
            "POST",
            f"{url}/chat/completions",
            timeout=120,
            json={
                "model": model,
                "messages": ask,
                "max_tokens": 16,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and events[-1] == "data: [DONE]"
        assert '"choices":[],"usage":{"prompt_tokens"' in events[-2]  # the usage chunk
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        }
        tool = {"type": "function", "function": {"name": "weather", "parameters": schema}}
        reply = httpx.post(
            f"{url}/chat/completions",
            timeout=120,
            json={
                "model": model,
                "messages": ask,
                "tools": [tool],
                "tool_choice": "required",
                "max_tokens": 60,
                "parallel_tool_calls": False,
            },
        ).json()
        (call,) = reply["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        reply = httpx.post(
            f"{url}/chat/completions",
            timeout=120,
            json={"model": model, "messages": ask, "max_tokens": 60, "response_format": fmt},
        ).json()
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(len(probe_devices()) < 2, reason="needs two GPUs")
def test_on_two_gpus_each_model_is_on_its_device_and_each_device_under_its_cap() -> None:
    """The three shapes, three agents each, all decoding, under a 3 GiB limit per device: the
    models are spread over both devices, each device's NVML peak holds the weights of the
    models STATUS places there and stays under that device's cap, and LIST puts each agent
    on its model's device."""
    d = Daemon("--vram-limit", "3GiB")
    try:
        w = d.wire()
        with PeakSampler(d.pid, index=0) as zero, PeakSampler(d.pid, index=1) as one:
            agents = [(f"{m}-{i}", m) for m in THREE for i in range(3)]
            for agent, model in agents:
                w.ok("REGISTER", agent=agent, model=model, n_ctx=2048)
            ids = [
                w.send("DECODE", agent=agent, prompt=" hello" * 200, max_tokens=64)
                for agent, _ in agents
            ]
            replies = [w.recv() for _ in ids]
            status = w.ok("STATUS")
            listed = w.ok("LIST")["agents"]
        assert all(r["ok"] for r in replies), replies
        placed = {m: e["index"] for e in status["devices"] for m in e["ledger"]["by_model"]}
        assert set(placed) == set(THREE) and set(placed.values()) == {0, 1}, placed
        for entry, sampler in zip(status["devices"], (zero, one), strict=True):
            ledger = entry["ledger"]
            weights = sum(v["weights"] for v in ledger["by_model"].values())
            print(
                f"device {entry['index']}: {sorted(ledger['by_model'])} weights {weights} "
                f"NVML peak {sampler.peak} cap {ledger['cap']}"
            )
            assert weights <= sampler.peak < ledger["cap"]
        assert all(a["device"] == placed[a["model"]] for a in listed)
    finally:
        assert d.stop() == 0, d.log()


def test_partial_placement_keeps_greedy_output_and_the_cap_at_every_split() -> None:
    """The Llama-3.2-1B shape under budgets from its full need down to the least a daemon can
    hold it with: the daemon places all its layers, fewer, then none on the device; the
    greedy text is the same at every split, and NVML's peak stays under each cap."""
    from lmxd.bench.offload import N_CTX, budget_for
    from lmxd.modelfile import read_model_info

    info = read_model_info(catalog.resolve_model("synth-llama3.2-1b", catalog.models_dir()))
    layers = info.n_layer + 1
    least, full = budget_for(info, 0), budget_for(info, layers)
    placed, texts = [], []
    for share in (100, 60, 30, 0):
        budget = least + (full - least) * share // 100
        d = Daemon("--vram-limit", f"{budget}B", "--vram-cap-percent", "100", "--max-seqs", "1")
        try:
            w = d.wire()
            with PeakSampler(d.pid) as sampler:
                got = w.ok("REGISTER", agent="a", model="synth-llama3.2-1b", n_ctx=N_CTX)
                r = w.ok("DECODE", agent="a", prompt=" 1, 2, 3, 4," * 200, max_tokens=48)
                status = w.ok("STATUS")
            cap = status["ledger"]["cap"]
            print(
                f"\npartial {share}%: cap {cap} layers {got['n_gpu_layers']}/{got['layers']} "
                f"estimated {got['estimated_speed']} NVML peak {sampler.peak} "
                f"{r['tokens_per_s']:.1f} tok/s"
            )
            assert cap == budget and got["layers"] == layers
            assert sampler.available and 0 < sampler.peak < cap, (sampler.peak, cap)
            host = status["host"]
            assert host is not None and host["reserved"] > 0
            placed.append(got["n_gpu_layers"])
            texts.append(r["text"])
        finally:
            assert d.stop() == 0, d.log()
    assert placed[0] == layers and placed[-1] == 0
    assert placed == sorted(placed, reverse=True) and 0 < placed[2] < placed[1] < layers
    assert all(t == texts[0] for t in texts), texts


@pytest.mark.skipif(len(probe_devices()) < 2, reason="needs two GPUs")
def test_a_model_too_large_for_either_gpu_is_split_over_both_with_the_same_greedy_text() -> None:
    """The Llama-3.2-1B shape with room for 70% of it (beyond the CUDA context) on each of
    two devices: it is split over both by layer, no layer left in host RAM; each device's
    NVML peak holds its share's weights and stays under its cap; the greedy text is the one
    it gives whole on one device."""
    from lmxd.bench.offload import N_CTX, budget_for
    from lmxd.memory.estimator import CUDA_OVERHEAD
    from lmxd.modelfile import read_model_info

    info = read_model_info(catalog.resolve_model("synth-llama3.2-1b", catalog.models_dir()))
    layers = info.n_layer + 1
    full = budget_for(info, layers)
    room = CUDA_OVERHEAD + (full - CUDA_OVERHEAD) * 7 // 10
    texts = []
    alone = ["--devices", "0", "--vram-limit", f"{full}B"]
    for limit in (alone, ["--devices", "0,1", "--vram-limit", f"{room}B"]):
        d = Daemon(*limit, "--vram-cap-percent", "100", "--max-seqs", "1")
        try:
            w = d.wire()
            with PeakSampler(d.pid, index=0) as zero, PeakSampler(d.pid, index=1) as one:
                got = w.ok("REGISTER", agent="a", model="synth-llama3.2-1b", n_ctx=N_CTX)
                r = w.ok("DECODE", agent="a", prompt=" 1, 2, 3, 4," * 200, max_tokens=48)
                status = w.ok("STATUS")
            print(f"\n{limit}: {got['devices']} NVML peaks {zero.peak} {one.peak}")
            assert got["n_gpu_layers"] == layers
            texts.append(r["text"])
        finally:
            assert d.stop() == 0, d.log()
    assert [s["device"] for s in got["devices"]] == [0, 1]
    assert sum(s["n_gpu_layers"] for s in got["devices"]) == layers
    for entry, sampler in zip(status["devices"], (zero, one), strict=True):
        ledger = entry["ledger"]
        assert ledger["cap"] == room
        assert ledger["by_model"]["synth-llama3.2-1b"]["weights"] <= sampler.peak < room
    assert texts[0] == texts[1], texts
