"""``GET /metrics``: the daemon's state in Prometheus's text format, read at scrape time.

Gauges come from the Service's STATUS, LIST and MODELS; counters from what the Service and the
HTTP front have counted since the start. Three vLLM names are served as aliases, because
inference gateways route by them: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``
and ``vllm:kv_cache_usage_perc`` (KV cells in use over cells in every open context, 0 to 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmxd.service import Service


class ServiceCollector(Collector):
    def __init__(self, service: Service, http_requests: Counter[tuple[str, int]]) -> None:
        self.service = service
        self.http_requests = http_requests  # (route, status) -> requests answered

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        status, agents, models = svc.status(), svc.list_agents(), svc.models()
        queue = status["queue"]
        running, waiting = queue["running"], queue["depth"] - queue["running"]
        cells = sum(m.pool_cells for m in models)
        used = sum(m.used_cells for m in models)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("lmxd_requests_running", "DECODE jobs generating now", running)
        yield gauge("lmxd_requests_waiting", "DECODE jobs waiting for their turn", waiting)
        yield gauge("lmxd_queue_max", "Jobs waiting or running before BUSY / 429", queue["max"])
        yield gauge("vllm:num_requests_running", "Alias of lmxd_requests_running", running)
        yield gauge("vllm:num_requests_waiting", "Alias of lmxd_requests_waiting", waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV cells in use / cells in open contexts",
            used / cells if cells else 0.0,
        )

        # One series per device in use, labelled with its index.
        per_device = {
            name: GaugeMetricFamily(name, doc, labels=["device"])
            for name, doc in (
                ("lmxd_ledger_cap_bytes", "Bytes the device's VRAM ledger admits"),
                ("lmxd_ledger_reserved_bytes", "Bytes reserved in the device's ledger"),
                (
                    "lmxd_ledger_unaccounted_bytes",
                    "Device bytes beyond every reservation, charged to its ledger (GPU)",
                ),
                ("lmxd_device_total_bytes", "Device memory in all"),
                ("lmxd_device_free_bytes", "Device memory free"),
                ("lmxd_device_process_used_bytes", "Device memory this process uses"),
            )
        }
        owners = GaugeMetricFamily(
            "lmxd_ledger_owner_bytes",
            "Ledger bytes by device and owner",
            labels=["device", "owner"],
        )
        for entry in status["devices"]:
            index, ledger, device = str(entry["index"]), entry["ledger"], entry["device"]
            for name, value in (
                ("lmxd_ledger_cap_bytes", ledger["cap"]),
                ("lmxd_ledger_reserved_bytes", ledger["reserved"]),
                ("lmxd_ledger_unaccounted_bytes", ledger["unaccounted"]),
                ("lmxd_device_total_bytes", device["total"]),
                ("lmxd_device_free_bytes", device["free"]),
                ("lmxd_device_process_used_bytes", device["process_used"]),
            ):
                per_device[name].add_metric([index], value)
            for owner, nbytes in ledger["by_owner"].items():
                owners.add_metric([index, owner], nbytes)
        yield from per_device.values()
        yield owners
        yield gauge(
            "lmxd_parked_host_bytes", "Host RAM holding parked KV", status["parked_host_bytes"]
        )
        yield gauge("lmxd_park_budget_bytes", "Host RAM parked KV may take", status["park_budget"])
        disk = status["disk"] or {"bytes": 0, "files": 0}
        yield gauge("lmxd_parked_disk_bytes", "Disk holding spilled agents' KV", disk["bytes"])
        yield gauge("lmxd_parked_disk_files", "Spilled agents' state files", disk["files"])
        yield gauge("lmxd_agents", "Agents registered", status["agents"])
        yield gauge("lmxd_uptime_seconds", "Seconds since the daemon started", status["uptime_s"])

        transfers = status["transfers"]
        for name, key, doc in (
            ("lmxd_parks", "parks", "Agents parked (KV moved to host RAM)"),
            ("lmxd_park_bytes", "park_bytes", "Bytes of KV copied by parks"),
            ("lmxd_park_seconds", "park_s", "Seconds spent parking"),
            ("lmxd_parks_ahead", "parks_ahead", "Parks that only freed cells (written ahead)"),
            ("lmxd_copies_ahead", "copies_ahead", "Idle agents' KV copied ahead of need"),
            ("lmxd_copy_ahead_bytes", "copy_ahead_bytes", "Bytes of KV copied ahead of need"),
            ("lmxd_copy_ahead_seconds", "copy_ahead_s", "Seconds spent copying ahead of need"),
            ("lmxd_restores", "restores", "Agents restored (KV back from host RAM)"),
            ("lmxd_restore_bytes", "restore_bytes", "Bytes of KV restored"),
            ("lmxd_restore_seconds", "restore_s", "Seconds spent restoring"),
            ("lmxd_spills", "spills", "Parked states written to disk (park budget full)"),
            ("lmxd_spill_bytes", "spill_bytes", "Bytes of KV written to disk"),
            ("lmxd_spill_seconds", "spill_s", "Seconds spent writing KV to disk"),
            ("lmxd_disk_reads", "disk_reads", "Restores whose KV was read back from disk"),
            ("lmxd_disk_read_bytes", "disk_read_bytes", "Bytes of KV read back from disk"),
            ("lmxd_disk_read_seconds", "disk_read_s", "Seconds spent reading KV from disk"),
        ):
            yield CounterMetricFamily(name, doc, value=transfers[key])

        labels = ["model", "agent"]
        tokens = {
            kind: CounterMetricFamily(name, doc, labels=labels)
            for kind, name, doc in (
                ("prompt", "lmxd_prompt_tokens", "Prompt tokens prefilled"),
                ("cached", "lmxd_cached_prompt_tokens", "Prompt tokens found in KV already"),
                ("generated", "lmxd_generation_tokens", "Tokens generated"),
            )
        }
        for (model, agent, kind), n in svc.tokens.items():
            tokens[kind].add_metric([model, agent], n)
        yield from tokens.values()
        decodes = CounterMetricFamily(
            "lmxd_decode_requests",
            "DECODEs ended, by stop reason or error code",
            labels=["model", "outcome"],
        )
        for (model, outcome), n in svc.decodes.items():
            decodes.add_metric([model, outcome], n)
        yield decodes
        http = CounterMetricFamily(
            "lmxd_http_requests", "HTTP requests answered", labels=["route", "status"]
        )
        for (route, code), n in self.http_requests.items():
            http.add_metric([route, str(code)], n)
        yield http

        per_model = {
            name: GaugeMetricFamily(name, doc, labels=["model"])
            for name, doc in (
                ("lmxd_model_agents", "Agents registered on the model"),
                ("lmxd_model_weights_bytes", "The model's weights on its device(s)"),
                ("lmxd_model_context_bytes", "Bytes reserved for the model's context"),
                ("lmxd_model_kv_cells", "KV cells in the model's context"),
                ("lmxd_model_kv_cells_used", "KV cells in use"),
            )
        }
        for m in models:
            values = (m.refcount, m.weights_bytes, m.context_bytes, m.pool_cells, m.used_cells)
            for family, value in zip(per_model.values(), values, strict=True):
                family.add_metric([m.model], value)
        yield from per_model.values()
        kv = GaugeMetricFamily(
            "lmxd_agent_kv_tokens",
            "Tokens of the agent's conversation in KV",
            labels=["agent", "model", "state"],
        )
        for a in agents:
            kv.add_metric([a.agent, a.model, a.state], a.kv_tokens)
        yield kv


class Metrics:
    """The registry /metrics renders, and the HTTP front's request counts."""

    def __init__(self, service: Service) -> None:
        self.http_requests: Counter[tuple[str, int]] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service, self.http_requests))

    def render(self) -> bytes:
        return generate_latest(self.registry)
