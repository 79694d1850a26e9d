"""How a job ends: its reply, the agent's conversation remembered, the agent's next state.

A reply is built when its job ends and held in :attr:`Endings.pending` until the scheduler's
bookkeeping for the step (forced parks included) is done, so that a client that asks right
after its reply finds the agent where the reply left it; :meth:`Endings.send` then resolves
the jobs' futures. A failed job's stream ends with its error; a finished one's with its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lmxd import logs
from lmxd.chat.messages import ChatMessage
from lmxd.engine.worker import Worker
from lmxd.errors import LmxdError
from lmxd.results import DecodeResult, StopReason
from lmxd.scheduler.agents import Activity, Agent
from lmxd.scheduler.jobs import Job
from lmxd.scheduler.slots import ModelSlot

log = logging.getLogger("lmxd.scheduler")


class Endings:
    """Ends jobs for the scheduler (its asyncio task only)."""

    def __init__(self, worker: Worker, wake: Callable[[], None]) -> None:
        self.worker = worker
        self._wake = wake  # the scheduler's: an agent with a next job needs its turn
        self.pending: list[tuple[Job, DecodeResult]] = []

    def hold(self, slot: ModelSlot) -> None:
        """Replies of ``slot``'s jobs wait for its forced parks (``--park-after-decode``)."""
        slot.held += [r for r in self.pending if r[0].agent.slot is slot]
        self.pending[:] = [r for r in self.pending if r[0].agent.slot is not slot]

    def release_held(self, slot: ModelSlot) -> None:
        """Replies held for forced parks go out (the parks are done, or cannot be)."""
        self.pending += slot.held
        slot.held.clear()

    def finish(self, agent: Agent, job: Job, reason: StopReason | None) -> None:
        reply = job.reply
        text = reply.text if reply is not None else ""
        if job.timings.admitted is not None:  # prepared: its prompt is the conversation now
            self._remember(agent, job)
        timings = job.timings.as_ms()
        generated = reply.n_tokens if reply is not None else 0
        decode_s = timings["decode"] / 1000
        wanted_logprobs = reply is not None and job.request.top_logprobs is not None
        result = DecodeResult(
            agent=agent.id,
            text=text,
            prompt_tokens=job.prompt_tokens,
            cached_tokens=job.cached_tokens,
            generated_tokens=generated,
            stop_reason=reason or StopReason.CANCELLED,
            timings_ms=timings,
            restored=job.restored,
            parked=job.parked,
            tokens_per_s=round(generated / decode_s, 2) if decode_s > 0 else 0.0,
            logprobs=reply.logprobs if reply is not None and wanted_logprobs else None,
        )
        self.end(agent, job)
        self.pending.append((job, result))

    def _remember(self, agent: Agent, job: Job) -> None:
        """What the agent's conversation is once ``job`` is done: its history, and the text its
        tokens spell (the rendered conversation and every token of the reply, the text after
        a stop string included: they are in the sequence)."""
        reply = job.reply
        if job.history is not None:  # a chat, or a whole conversation; [] for a raw prompt
            answer = ChatMessage("assistant", reply.text if reply is not None else "")
            agent.history = [*job.history, answer] if job.history else []
        if job.text is None:
            agent.text = None  # raw text appended: tokenize afresh next time
            return
        agent.text = job.text + (reply.spelled if reply is not None else "")
        agent.text_bos, agent.reply_at = job.add_bos, len(job.text)

    def send(self) -> None:
        for job, result in self.pending:
            if not job.done.done():
                job.done.set_result(result)
        self.pending.clear()

    def fail(self, agent: Agent, job: Job, exc: LmxdError) -> None:
        logs.failed(log, "DECODE", exc, agent=agent.id)
        agent.text = None  # its tokens may have changed: tokenize the next prompt afresh
        job.fail(exc)
        ctx, seq = agent.slot.context, agent.seq
        if job.started and ctx is not None and seq is not None:
            self.worker.drop(ctx, seq)  # frees a host sampler chain
        self.end(agent, job, stream_ended=True)

    def end(self, agent: Agent, job: Job, stream_ended: bool = False) -> None:
        """The job leaves the agent, which goes idle, or waits for its next job."""
        agent.jobs.remove(job)
        if job.events is not None and not stream_ended:
            job.events.put_nowait(None)  # end of stream
        agent.last_used = time.time()
        after = Activity.QUEUED if agent.jobs else Activity.IDLE
        if agent.activity is not after:
            agent.do(after)
        if agent.jobs:
            self._wake()
