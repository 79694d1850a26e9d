"""The article's text protocol, spoken on the same socket (``nc -U`` transcripts work).

One command per line; every answer line starts with ``OK`` or ``ERR``. Told apart from JSON
lines by the connection's first byte. The commands map onto the same Service calls::

    REGISTER <agent_id>\\t<gguf path or catalog name>
    DECODE <agent_id> <n_tokens> <prompt text>
    UNREGISTER <agent_id>
    STATUS | LIST | HELP
"""

from __future__ import annotations

import asyncio
import logging

from lmxd import protocol
from lmxd.errors import LedgerDenied, LineTooLong, LmxdError, ProtocolError, UnknownOp
from lmxd.fronts.unix import Connection
from lmxd.service import DecodeRequest, Service, TextPrompt

log = logging.getLogger("lmxd.fronts.text")

SCHEMA = "lmx-daemon/1"
HELP = [
    "OK commands: REGISTER <agent_id>\\t<gguf path>",
    "OK          DECODE <agent_id> <n_tokens> <prompt text>",
    "OK          UNREGISTER <agent_id> | STATUS | LIST | HELP",
    "OK (a connection whose first byte is '{' speaks JSON lines instead: docs/protocol.md)",
]


def _err(exc: LmxdError) -> str:
    if isinstance(exc, LedgerDenied):
        d = exc.details
        return (
            f"ERR VRAM_LEDGER_DENY code={d['reason']} ledger_max_bytes={d['cap_bytes']} "
            f"ledger_allocated_bytes={d['reserved_bytes']} "
            f"requested_table_bytes={d['requested_bytes']}"
        )
    return f"ERR {exc.code} {' '.join(exc.message.split())}"


async def _command(svc: Service, line: str, uid: int) -> list[str]:
    if not line.strip():
        raise ProtocolError("an empty command; send HELP")
    verb, _, rest = line.partition(" ")
    verb = verb.upper()
    if verb == "HELP":
        return HELP
    if verb == "REGISTER":
        agent, tab, path = rest.partition("\t")
        if not tab or not protocol.is_agent_id(agent) or not path.strip():
            raise ProtocolError("usage: REGISTER <agent_id>\\t<gguf path>")
        # Shielded, as on JSON lines: a client that leaves must not cut a model load in half.
        got = await asyncio.shield(svc.register(agent, path.strip(), caller=uid))
        return [f"OK registered agent={agent} model={got.model}"]
    if verb == "DECODE":
        parts = rest.split(" ", 2)
        if (
            len(parts) < 2
            or not parts[1].isascii()
            or not parts[1].isdigit()
            or not 0 < int(parts[1]) <= protocol.INT32_MAX
        ):
            raise ProtocolError("usage: DECODE <agent_id> <n_tokens> <prompt text>")
        agent, n_tokens = parts[0], int(parts[1])
        prompt = TextPrompt(parts[2] if len(parts) > 2 else "")
        request = DecodeRequest(agent=agent, prompt=prompt, max_tokens=n_tokens)
        stream = svc.decode(request, uid)
        result = await stream.result()
        return [
            f"OK schema={SCHEMA}",
            f"OK invoke=DECODE agent_id={agent}",
            f"OK prompt_tokens={result.prompt_tokens} generated_tokens={result.generated_tokens}"
            f" stopped_on_eos={str(result.stop_reason.value == 'eos').lower()}",
            f"OK elapsed_ms={result.timings_ms['total']:.3f}",
            f"OK kv_swap_evicted={','.join(result.parked) or 'none'}"
            f" kv_swap_restored={str(result.restored).lower()}",
            "BEGIN_RESPONSE",
            result.text,
            "END_RESPONSE",
        ]
    if verb == "UNREGISTER":
        if not protocol.is_agent_id(rest.strip()):
            raise ProtocolError("usage: UNREGISTER <agent_id>")
        await asyncio.shield(svc.unregister(rest.strip(), uid))
        return [f"OK unregistered agent={rest.strip()}"]
    if verb == "STATUS":
        s = svc.status()
        return [
            f"OK device={s['device']['kind']} total_bytes={s['device']['total']} "
            f"free_bytes={s['device']['free']}",
            f"OK ledger_max_bytes={s['ledger']['cap']} ledger_allocated_bytes="
            f"{s['ledger']['reserved']}",
            f"OK agents={s['agents']} parked_host_bytes={s['parked_host_bytes']} "
            f"queue_depth={s['queue']['depth']}",
        ]
    if verb == "LIST":
        agents = svc.list_agents()
        lines = [
            f"OK agent={a.agent} model={a.model} state={a.state} n_ctx={a.n_ctx} tokens={a.tokens}"
            for a in agents
        ]
        return [*lines, f"OK agents={len(agents)}"]
    raise UnknownOp(f"unknown command {verb[:64]!r}; send HELP")


async def serve(service: Service, conn: Connection, first: bytes) -> None:
    async for raw in conn.lines(first):
        if isinstance(raw, LineTooLong):
            await conn.send((_err(raw) + "\n").encode())
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            await conn.send(b"ERR BAD_UTF8 commands are UTF-8\n")
            continue
        command = asyncio.ensure_future(_command(service, text, conn.uid))
        # One command at a time, so nothing reads the socket meanwhile: watch for the client
        # leaving (end of stream) so that its DECODE stops instead of running to the end.
        try:
            while not command.done():
                await asyncio.wait({command}, timeout=0.1)
                if conn.reader.at_eof() and not command.done():
                    command.cancel()
                    return
        finally:
            command.cancel()  # the daemon is stopping: stop the command too
        try:
            lines = command.result()
        except LmxdError as exc:
            lines = [_err(exc)]
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("internal error on text command %r", text[:200])
            lines = [_err(LmxdError(f"internal error: {exc!r}"))]
        await conn.send(("\n".join(lines) + "\n").encode())
