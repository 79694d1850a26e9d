"""Two lmxd daemons as two nodes behind LiteLLM's proxy (docs/scale-out.md), end to end.

Node A holds the agent `coder` (SmolLM2), node B the agent `writer` (Gemma 3); the proxy routes
each agent's name, the OpenAI `model` field, to the node that holds it, with the config that
docs/scale-out.md shows (read from there, the nodes' addresses put in). The tests run in file
order and share one proxy: the last one stops node B.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from daemon_harness import Daemon
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale-out.md"
LITELLM = Path(sys.executable).with_name("litellm")
ASK = [{"role": "user", "content": "Say hello in three words."}]
# LiteLLM's switches for working offline: its bundled model cost map instead of fetching one,
# no telemetry, and bundled copies of whatever else it would fetch on its own.
OFFLINE = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_TELEMETRY_DISABLED": "true",
}


@dataclass
class Node:
    daemon: Daemon
    key: str
    agent: str
    model: str
    url: str = ""

    def get(self, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    def agents(self) -> dict[str, dict[str, Any]]:
        w = self.daemon.wire()
        try:
            return {a["agent"]: a for a in w.ok("LIST")["agents"]}
        finally:
            w.close()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = self.get("/metrics").text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@dataclass
class Cluster:
    a: Node
    b: Node
    url: str  # the proxy's
    master_key: str
    log: Path

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.master_key, max_retries=0, timeout=60)

    def health(self, model: str) -> httpx.Response:
        """LiteLLM's health check of one model group: a probe request to its deployment."""
        headers = {"Authorization": f"Bearer {self.master_key}"}
        return httpx.get(f"{self.url}/health", params={"model": model}, headers=headers, timeout=60)

    def proxy_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def litellm_config(a_url: str, b_url: str) -> str:
    """The YAML block of docs/scale-out.md, with the test's nodes for node-a and node-b."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    config: str = blocks[0]
    assert config.count("http://node-a:8437") == 1 and config.count("http://node-b:8437") == 1
    return config.replace("http://node-a:8437", a_url).replace("http://node-b:8437", b_url)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def start_proxy(
    config: Path, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`litellm --config` on a free port, once it answers its readiness check (about 10 s on
    2 cores: importing LiteLLM is most of it); the port is picked again if it was taken."""
    for _attempt in range(3):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=config.parent,  # LiteLLM puts its working directory on sys.path
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        stop_proxy(proc)
        if "address already in use" not in log.read_text(errors="replace"):
            break
    raise AssertionError(f"LiteLLM's proxy did not start:\n{log.read_text(errors='replace')}")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert LITELLM.exists(), f"no {LITELLM}: LiteLLM is a dev dependency (pip install -e '.[dev]')"
    tmp = tmp_path_factory.mktemp("scaleout")
    keys = {"LMXD_KEY_A": secrets.token_hex(16), "LMXD_KEY_B": secrets.token_hex(16)}
    a = Node(
        Daemon("--api-key", keys["LMXD_KEY_A"], http=True),
        keys["LMXD_KEY_A"],
        "coder",
        "smollm2-135m",
    )
    try:
        b = Node(
            Daemon("--api-key", keys["LMXD_KEY_B"], http=True),
            keys["LMXD_KEY_B"],
            "writer",
            "gemma3-270m",
        )
    except BaseException:
        a.daemon.stop()
        raise
    proc = None
    try:
        for node in (a, b):
            node.url = node.daemon.http_url
            w = node.daemon.wire()
            w.ok("REGISTER", agent=node.agent, model=node.model, n_ctx=512)
            w.close()
        config = tmp / "litellm-config.yaml"
        config.write_text(litellm_config(a.url, b.url))
        master_key = f"sk-{secrets.token_hex(16)}"
        env = {**os.environ, **OFFLINE, **keys, "LITELLM_MASTER_KEY": master_key}
        log = tmp / "litellm.log"
        proc, url = start_proxy(config, env, log)
        yield Cluster(a, b, url, master_key, log)
    finally:
        if proc is not None:
            stop_proxy(proc)
        b.daemon.stop()
        assert a.daemon.stop() == 0, a.daemon.log()


def _count(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


def test_each_agent_answers_through_the_proxy_from_the_node_that_holds_it(cluster: Cluster) -> None:
    client = cluster.client()
    nodes = (cluster.a, cluster.b)
    before = {node.agent: node.metrics() for node in nodes}
    for node, other in ((cluster.a, cluster.b), (cluster.b, cluster.a)):
        raw = client.chat.completions.with_raw_response.create(
            model=node.agent, messages=ASK, max_tokens=8
        )
        reply = raw.parse()
        assert reply.choices[0].message.content, cluster.proxy_log()
        assert reply.model == node.agent and reply.usage is not None
        # LiteLLM passes the node's response headers on, prefixed: lmxd's names the agent.
        assert raw.headers["llm_provider-x-lmxd-agent"] == node.agent
        assert raw.headers["x-litellm-model-api-base"] == f"{node.url}/v1"
        # The agent's conversation is in the KV of its node, and only there: the other node
        # knows no such agent (what a round-robin router would run into).
        held = node.agents()[node.agent]
        assert held["tokens"] == reply.usage.total_tokens, held
        assert node.agent not in other.agents()
        direct = OpenAI(base_url=f"{other.url}/v1", api_key=other.key, max_retries=0)
        with pytest.raises(openai.NotFoundError) as unknown:
            direct.chat.completions.create(model=node.agent, messages=ASK, max_tokens=8)
        assert unknown.value.code == "model_not_found"

    for node in nodes:
        after = node.metrics()
        was = before[node.agent]
        for gauge in (
            "lmxd_requests_running",
            "lmxd_requests_waiting",
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        ):
            assert gauge in {name for name, _ in after}, gauge
        assert _count(after, "lmxd_requests_running") == 0  # idle again
        assert _count(after, "vllm:num_requests_running") == 0
        assert _count(after, "vllm:kv_cache_usage_perc") > 0  # the agent's KV is resident
        # Each node counts the one request it served, and nothing of the other's.
        served = _count(after, "lmxd_decode_requests_total", model=node.model)
        assert served - _count(was, "lmxd_decode_requests_total", model=node.model) == 1
        assert _count(after, "lmxd_decode_requests_total") == served
        assert _count(after, "lmxd_generation_tokens_total", agent=node.agent) > 0


def test_health_lmxd_s_for_probes_and_litellm_s_per_agent(cluster: Cluster) -> None:
    for node in (cluster.a, cluster.b):
        health = httpx.get(f"{node.url}/health", timeout=30)  # needs no API key
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["agents"] >= 1

        tokens = node.agents()[node.agent]["tokens"]
        checked = cluster.health(node.agent)
        assert checked.status_code == 200, checked.text
        body = checked.json()
        assert body["healthy_count"] == 1 and body["unhealthy_count"] == 0, body
        (endpoint,) = body["healthy_endpoints"]
        assert endpoint["api_base"] == f"{node.url}/v1"
        assert endpoint["model"] == f"openai/{node.model}"  # health_check_model
        # The probe went to one of the model's auto-agents: the agent's conversation is whole.
        agents = node.agents()
        assert agents[node.agent]["tokens"] == tokens
        assert any(a["auto"] and a["model"] == node.model for a in agents.values()), agents


def test_a_stopped_node_fails_its_own_agents_and_no_other_until_it_is_back(
    cluster: Cluster,
) -> None:
    """Runs last: it stops node B, then starts it again on its address and --park-dir."""
    client = cluster.client()
    b = cluster.b
    tokens = b.agents()["writer"]["tokens"]
    assert b.daemon.stop() == 0, b.daemon.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{b.url}/health", timeout=5)

    def writer_fails(stream: bool) -> openai.InternalServerError:
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(
                model="writer", messages=ASK, max_tokens=8, stream=stream
            )
        return failed.value

    def coder_streams() -> str:
        chunks = client.chat.completions.create(
            model="coder", messages=ASK, max_tokens=8, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:  # at once: writer plain and streamed, and coder
        failing = [pool.submit(writer_fails, stream) for stream in (False, True)]
        answering = pool.submit(coder_streams)
        assert answering.result()
        for future in failing:  # a stream fails before it starts, with the same error
            error = future.result()
            assert error.status_code == 500
            assert error.body == {
                "message": "litellm.InternalServerError: InternalServerError: OpenAIException "
                "- Connection error.\n\nLiteLLM: model group 'writer' failed with the error "
                "above. No fallback was attempted.",
                "type": "internal_server_error",
                "param": None,
                "code": "500",
            }, error.body
    assert time.monotonic() - started < 30  # after LiteLLM's retries (2 by default)

    checked = cluster.health("writer")
    assert checked.status_code == 503, checked.text
    body = checked.json()
    assert body["healthy_count"] == 0 and body["unhealthy_count"] == 1, body
    (endpoint,) = body["unhealthy_endpoints"]
    assert endpoint["api_base"] == f"{b.url}/v1"
    assert "Connection error" in endpoint["error"]
    assert cluster.health("coder").json()["healthy_count"] == 1

    # Back on the same address with the same --park-dir: the agent is registered again from
    # disk with its conversation, and answers through the proxy at once.
    state = b.daemon.dir / "state"
    b.daemon = Daemon(
        "--api-key", b.key, "--park-dir", str(state), http=b.url.removeprefix("http://")
    )
    assert b.agents()["writer"]["tokens"] == tokens
    raw = client.chat.completions.with_raw_response.create(
        model="writer", messages=ASK, max_tokens=8
    )
    assert raw.headers["llm_provider-x-lmxd-agent"] == "writer"
    again = raw.parse()
    assert again.choices[0].message.content and again.usage is not None
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens, again.usage  # in KV again
    assert cluster.health("writer").json()["healthy_count"] == 1
