"""A worker that dies is noticed whether the engine is busy or idle, and with restarts on the
engine replaces its worker grid: only the requests that were running fail; waiting ones run on
the new grid and give diffusers' images; crashes in a row back off and finally give up."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec
import numpy as np
import pytest

from engine import AsyncEngine, EngineDeadError, SamplingParams
from engine.core.restart_policy import RestartPolicy
from tests.conftest import diffusers_reference

pytestmark = pytest.mark.slow

LONG = SamplingParams(num_inference_steps=1000, seed=0)


def test_restart_policy_backs_off_then_gives_up_and_forgives_a_healthy_run():
    policy = RestartPolicy(max_restarts=3, base_delay_s=0.5, healthy_after_s=60)
    policy.started(0.0)
    assert [policy.next_delay(1.0), policy.next_delay(2.0), policy.next_delay(3.0)] == [0.5, 1.0, 2.0]
    assert policy.next_delay(4.0) is None  # the fourth crash in a row: give up
    policy = RestartPolicy(max_restarts=1, healthy_after_s=60)
    policy.started(0.0)
    assert policy.next_delay(10.0) == 0.5
    policy.started(10.0)
    assert policy.next_delay(100.0) == 0.5  # up for 90 s since: a new run of crashes


def _worker_pid(engine: AsyncEngine) -> int:
    (process,) = engine.core.executor.processes
    return process.pid


async def _until(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _final(stream):
    async for out in stream:
        pass
    return out


async def test_an_idle_worker_death_is_reported_within_5_s(qwen_dir):
    engine = AsyncEngine(model=str(qwen_dir), executor="mp")
    try:
        os.kill(_worker_pid(engine), signal.SIGKILL)
        await _until(lambda: engine.is_dead, 5.0)  # nobody sent a request: the idle watcher saw it
        with pytest.raises(EngineDeadError, match="died"):
            await engine.generate("a fox", SamplingParams(num_inference_steps=2)).__anext__()
    finally:
        engine.shutdown()


async def test_restart_fails_only_running_requests_and_runs_the_waiting_ones(qwen_dir):
    import diffusers

    waiting = {
        "heron": ({"prompt": "a grey heron", "negative_prompt": "fog"}, SamplingParams(num_inference_steps=3, seed=7)),
        "kiln": ({"prompt": "a brick kiln at night"}, SamplingParams(num_inference_steps=4, seed=11)),
    }
    async with AsyncEngine(model=str(qwen_dir), executor="mp", max_num_seqs=1, max_worker_restarts=2) as engine:
        first_pid = _worker_pid(engine)
        running = engine.generate("a long request", LONG, request_id="long")
        assert (await running.__anext__()).step >= 1  # running, holding the only slot
        queued = {
            rid: asyncio.ensure_future(
                _final(engine.generate(prompt, msgspec.structs.replace(params, output_type="np"), rid))
            )
            for rid, (prompt, params) in waiting.items()
        }
        await asyncio.sleep(0.2)
        os.kill(first_pid, signal.SIGKILL)
        failed = await asyncio.wait_for(_final(running), 30)
        assert failed.finished and "crashed" in failed.error and "restarted" in failed.error, failed.error
        done = {rid: await asyncio.wait_for(task, 60) for rid, task in queued.items()}
        assert _worker_pid(engine) != first_pid and not engine.is_dead
        assert engine.core.stats.restarts == 1 and 0 < engine.core.stats.restart_s < 60
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir))
    for rid, (prompt, params) in waiting.items():
        assert done[rid].error is None, done[rid].error
        expected = diffusers_reference(pipe, prompt, params, size=(64, 64))
        np.testing.assert_allclose(done[rid].images, expected, atol=1e-4)


async def test_an_idle_crash_is_replaced_and_crashes_in_a_row_give_up(qwen_dir):
    async with AsyncEngine(model=str(qwen_dir), executor="mp", max_worker_restarts=1) as engine:
        first_pid = _worker_pid(engine)
        os.kill(first_pid, signal.SIGKILL)
        await _until(lambda: engine.core.stats.restarts == 1, 60)
        out = await _final(engine.generate("after the restart", SamplingParams(num_inference_steps=2)))
        assert out.error is None and len(out.images) == 1
        # A second crash right away is the second in a row: with max_worker_restarts=1, the end.
        os.kill(_worker_pid(engine), signal.SIGKILL)
        await _until(lambda: engine.is_dead, 5.0)
        with pytest.raises(EngineDeadError, match="crashed 2 times in a row"):
            await engine.generate("too late", SamplingParams(num_inference_steps=2)).__anext__()
