"""The CPU thread count, chosen from the CPU time steps get (engine/threads.py): pure logic."""

from __future__ import annotations

import itertools

from lmxd.engine.threads import FIRST_TRY, ThreadTuner


class Machine:
    """A clock and a /proc/stat idle counter that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.idle = 0.0

    def run(self, seconds: float, idle_cores: float) -> None:
        self.now += seconds
        self.idle += seconds * idle_cores


def steps(tuner: ThreadTuner, machine: Machine, n: int, share: float, idle_cores: float) -> None:
    """``n`` steps of 20 ms in which the process gets ``share`` of the CPU its threads ask."""
    for _ in range(n):
        threads = tuner.choose()
        machine.run(0.02, idle_cores)
        tuner.record(threads, 0.02, 0.02 * threads * share)


def tuner_on(machine: Machine, n_max: int = 2) -> ThreadTuner:
    return ThreadTuner(n_max, idle=lambda: machine.idle, clock=lambda: machine.now)


def test_an_idle_machine_keeps_every_thread() -> None:
    machine = Machine()
    tuner = tuner_on(machine)
    steps(tuner, machine, 500, share=1.0, idle_cores=0.0)
    assert tuner.current == 2


def test_a_busy_core_sends_it_down_to_one_thread_within_a_few_steps() -> None:
    machine = Machine()
    tuner = tuner_on(machine)
    steps(tuner, machine, 4, share=0.52, idle_cores=0.0)  # measured: 0.52 with a core busy
    assert tuner.current == 1


def test_no_try_with_more_threads_while_the_cores_stay_taken() -> None:
    machine = Machine()
    tuner = tuner_on(machine)
    steps(tuner, machine, 4, share=0.52, idle_cores=0.0)
    asked = []
    for _ in range(5 * FIRST_TRY):
        asked.append(tuner.choose())
        machine.run(0.02, idle_cores=0.0)  # one thread of ours and the other process
        tuner.record(asked[-1], 0.02, 0.02 * asked[-1])
    assert set(asked) == {1}


def test_back_to_every_thread_once_the_other_process_is_gone() -> None:
    machine = Machine()
    tuner = tuner_on(machine)
    steps(tuner, machine, 4, share=0.52, idle_cores=0.0)
    assert tuner.current == 1
    steps(tuner, machine, FIRST_TRY + 1, share=1.0, idle_cores=1.0)
    assert tuner.current == 2


def test_a_failed_try_waits_twice_as_long_before_the_next() -> None:
    machine = Machine()
    tuner = tuner_on(machine)
    steps(tuner, machine, 4, share=0.52, idle_cores=0.0)
    tries = []
    for i in range(7 * FIRST_TRY):
        threads = tuner.choose()
        if threads == 2:
            tries.append(i)
        machine.run(0.02, idle_cores=1.0)  # cores look idle, yet a step with 2 threads
        tuner.record(threads, 0.02, 0.02 * threads * (0.5 if threads == 2 else 1.0))
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert tuner.current == 1 and len(tries) >= 2
    assert all(later >= 2 * earlier - 1 for earlier, later in itertools.pairwise(gaps))


def test_one_core_has_nothing_to_choose() -> None:
    machine = Machine()
    tuner = tuner_on(machine, n_max=1)
    steps(tuner, machine, 100, share=0.3, idle_cores=0.0)
    assert tuner.options == [1] and tuner.current == 1
