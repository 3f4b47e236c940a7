"""AsyncEngine over a worker process: same images as in-process, aborts, cancellation, death."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from engine import AsyncEngine, EngineDeadError, SamplingParams

pytestmark = pytest.mark.slow

CASES = [
    # (delay_s, prompt, params)
    (
        0.0,
        {"prompt": "a red fox", "negative_prompt": "blurry"},
        SamplingParams(num_inference_steps=6, seed=1, output_type="np"),
    ),
    (0.05, {"prompt": "a harbour town at night"}, SamplingParams(num_inference_steps=4, seed=2, output_type="np")),
    (
        0.1,
        {"prompt": "a tower", "negative_prompt": "fog"},
        SamplingParams(
            num_inference_steps=5,
            true_cfg_scale=2.0,
            seed=3,
            scheduler="UniPCMultistepScheduler",
            height=32,
            width=64,
            output_type="np",
        ),
    ),
    (0.2, {"prompt": "a small boat"}, SamplingParams(num_inference_steps=3, seed=4, output_type="np")),
]


async def _final(engine, prompt, params, request_id=None, delay=0.0):
    await asyncio.sleep(delay)
    outputs = [out async for out in engine.generate(prompt, params, request_id=request_id)]
    return outputs


async def _run_mix(engine):
    """The CASES, plus one request aborted and one consumer cancelled mid-flight."""
    long = SamplingParams(num_inference_steps=40, seed=9, output_type="np")
    victim_progress = asyncio.Event()

    async def victim():
        outputs = []
        async for out in engine.generate("to be aborted", long, request_id="victim"):
            outputs.append(out)
            victim_progress.set()
        return outputs

    async def cancelled():
        async for out in engine.generate("to be cancelled", long, request_id="cancelled"):
            pass

    victim_task = asyncio.create_task(victim())
    cancel_task = asyncio.create_task(cancelled())
    tasks = [asyncio.create_task(_final(engine, p, sp, f"case-{i}", d)) for i, (d, p, sp) in enumerate(CASES)]
    await victim_progress.wait()
    await engine.abort("victim")
    cancel_task.cancel()
    results = await asyncio.gather(*tasks)
    victim_outputs = await victim_task
    with pytest.raises(asyncio.CancelledError):
        await cancel_task
    return results, victim_outputs


async def test_worker_process_matches_inproc_with_abort_and_cancel(qwen_dir):
    mp = AsyncEngine(model=str(qwen_dir), executor="mp")
    inproc = AsyncEngine(model=str(qwen_dir), executor="inproc")
    try:
        mp_results, victim_outputs = await _run_mix(mp)
        inproc_results = await asyncio.gather(*(_final(inproc, p, sp) for _, p, sp in CASES))
        for got, want in zip(mp_results, inproc_results, strict=True):
            final, expected = got[-1], want[-1]
            assert final.error is None and expected.error is None
            assert float(np.abs(final.images - expected.images).max()) < 1e-4
            progress = [o for o in got if not o.finished]
            assert all(0 < o.step <= o.num_steps for o in progress)
        assert victim_outputs[-1].error == "request aborted" and victim_outputs[-1].finished
        assert await mp.worker_state_ids() == []
        # a duplicate request id in flight is a clear error
        first = mp.generate("one", SamplingParams(num_inference_steps=3), request_id="dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in flight"):
            await mp.generate("two", request_id="dup").__anext__()
        await first.aclose()
        # breaking out of the loop aborts the request and frees its state
        async for _ in mp.generate("walk away", SamplingParams(num_inference_steps=30), request_id="leaver"):
            break
        await asyncio.sleep(0.5)
        assert await mp.worker_state_ids() == []
        # a busy engine (always a batch in flight with async scheduling) still answers at once
        busy = mp.generate("busy", SamplingParams(num_inference_steps=1000), request_id="busy")
        await busy.__anext__()
        assert await asyncio.wait_for(mp.worker_state_ids(), 5) == ["busy"]
        assert not (await busy.__anext__()).finished  # and goes on stepping afterwards
        await busy.aclose()
    finally:
        mp.shutdown()
        inproc.shutdown()
    assert all(p.exitcode is not None for p in mp.core.executor.processes)


async def test_killed_worker_fails_requests_fast_and_fresh_engine_works(qwen_dir):
    engine = AsyncEngine(model=str(qwen_dir), executor="mp")
    try:
        started = asyncio.Event()

        async def long_request():
            outputs = []
            async for out in engine.generate("doomed", SamplingParams(num_inference_steps=1000)):
                outputs.append(out)
                started.set()
            return outputs

        task = asyncio.create_task(long_request())
        await started.wait()
        os.kill(engine.core.executor.processes[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        outputs = await asyncio.wait_for(task, timeout=10)
        assert time.monotonic() - t0 < 5
        assert outputs[-1].finished and "died" in outputs[-1].error
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="died"):
            await engine.generate("later", SamplingParams(num_inference_steps=2)).__anext__()
        assert time.monotonic() - t0 < 1
    finally:
        engine.shutdown()
    fresh = AsyncEngine(model=str(qwen_dir), executor="mp")
    try:
        outputs = [
            o async for o in fresh.generate("alive again", SamplingParams(num_inference_steps=2, output_type="np"))
        ]
        assert outputs[-1].error is None and outputs[-1].images.shape[0] == 1
    finally:
        fresh.shutdown()


async def test_model_load_failure_reaches_the_user(tmp_path, qwen_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="worker 0 failed to start"):
        AsyncEngine(model=str(broken), executor="mp")


async def test_shutdown_ends_open_streams(qwen_dir):
    engine = AsyncEngine(model=str(qwen_dir), executor="inproc")
    stream = engine.generate("never finishes", SamplingParams(num_inference_steps=1000))
    await stream.__anext__()
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
    last = None
    async for last in stream:
        pass
    assert last is not None and last.finished and last.error == "engine shut down"
    with pytest.raises(RuntimeError, match="shut down"):
        await engine.generate("after", SamplingParams(num_inference_steps=2)).__anext__()
