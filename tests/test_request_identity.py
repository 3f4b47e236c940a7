"""A request id names one request for its life: a live id is refused, and an id reused after its
request ended (finished, aborted, failed) gets fresh state, so nothing of the old request (a
cached prompt embedding, an in-flight result, worker state) reaches the new one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import AsyncEngine, SamplingParams
from engine.contract.messages import StepOutput, StepResults
from engine.core.request import Request
from engine.core.scheduler import StepScheduler


def _request(request_id: str, steps: int = 3) -> Request:
    return Request(request_id=request_id, params=SamplingParams(num_inference_steps=steps), seed=0, arrival_time=0.0)


def test_scheduler_refuses_a_live_id_and_isolates_a_reused_one():
    s = StepScheduler(max_num_seqs=4, max_batches_in_flight=2, overlap=True)
    s.add_request(_request("fox"))
    with pytest.raises(ValueError, match="'fox' is already in flight"):
        s.add_request(_request("fox"))
    b0 = s.schedule(0.0)
    assert [n.request_id for n in b0.new] == ["fox"]
    s.abort("fox")
    s.add_request(_request("fox"))  # resubmitted while the old one's step is still in flight
    b1 = s.schedule(0.0)
    (new,) = b1.new
    assert b1.drop == ["fox"] and new.request_id != "fox"
    # The old incarnation's result comes back late: it must not count for the new one.
    late = StepResults(step_id=b0.step_id, outputs=[StepOutput(request_id="fox", step=3, num_steps=3, finished=True)])
    assert s.update(late, 0.0) == []
    (progress,) = s.update(
        StepResults(step_id=b1.step_id, outputs=[StepOutput(request_id=new.request_id, step=1, num_steps=3)]), 0.0
    )
    assert progress.request_id == "fox" and progress.step == 1 and not progress.finished


async def _final(engine, prompt, params, request_id):
    async for out in engine.generate(prompt, params, request_id=request_id):
        pass
    assert out.error is None, out.error
    return out.images


@pytest.mark.parametrize("executor", ["inproc", "mp"])
async def test_reused_ids_get_their_own_prompt_and_state(qwen_dir, executor):
    params = SamplingParams(num_inference_steps=3, seed=5, output_type="np")
    async with AsyncEngine(model=str(qwen_dir), executor=executor) as engine:
        expected = {p: await _final(engine, p, params, f"fresh-{p}") for p in ("a red fox", "a blue whale")}
        # Twice in a row, different prompts: the second must not reuse the first's prompt.
        assert np.array_equal(await _final(engine, "a red fox", params, "fox"), expected["a red fox"])
        assert np.array_equal(await _final(engine, "a blue whale", params, "fox"), expected["a blue whale"])
        # Aborted mid-run, then resubmitted at once under the same id.
        stream = engine.generate("a red fox", SamplingParams(num_inference_steps=50, seed=1), request_id="fox")
        async for out in stream:
            if out.step >= 2:
                break
        await stream.aclose()  # leaving the stream aborts the request
        assert np.array_equal(await _final(engine, "a blue whale", params, "fox"), expected["a blue whale"])
        assert await engine.worker_state_ids() == []


async def test_an_id_is_free_as_soon_as_its_final_output_is_out(qwen_dir):
    """A caller that takes outputs until `finished` and stops there (never exhausting the
    generator) can reuse the id at once: it does not stay "in flight" until garbage collection."""
    params = SamplingParams(num_inference_steps=2, seed=3)
    async with AsyncEngine(model=str(qwen_dir), executor="inproc") as engine:
        for prompt in ("a red fox", "a blue whale", "a grey heron"):
            stream = engine.generate(prompt, params, request_id="fox")
            out = await stream.__anext__()
            while not out.finished:
                out = await stream.__anext__()
            assert out.error is None and len(out.images) == 1
        assert await engine.worker_state_ids() == []


@pytest.mark.parametrize("executor", ["inproc", "mp"])
async def test_an_abort_storm_with_reused_ids_never_crosses_outputs(qwen_dir, executor):
    """Ten ids, each reused by twelve requests in a row, half aborted at a random point and the
    id resubmitted at once. A request aborted while its last step ran used to deliver that
    step's final image to the next request under its id (which then also found the id "in
    flight"): every finished image must be its own prompt's and seed's."""
    import asyncio
    import random

    rng = random.Random(0)
    cases = [(f"a storm prompt {i}", 100 + i) for i in range(6)]
    params = {seed: SamplingParams(num_inference_steps=3, seed=seed, output_type="np") for _, seed in cases}
    async with AsyncEngine(model=str(qwen_dir), executor=executor, max_num_seqs=8) as engine:
        expected = {case: await _final(engine, case[0], params[case[1]], f"alone-{case[1]}") for case in cases}
        outcomes = []

        async def lane(k: int) -> None:
            for _ in range(12):
                prompt, seed = case = cases[rng.randrange(len(cases))]
                stream = engine.generate(prompt, params[seed], request_id=f"storm-{k}")
                out = await stream.__anext__()
                if rng.random() < 0.5 and not out.finished:
                    await asyncio.sleep(rng.random() * 0.05)
                    await engine.abort(f"storm-{k}")
                    await stream.aclose()
                    continue
                while not out.finished:
                    out = await stream.__anext__()
                await stream.aclose()
                outcomes.append((case, out))

        await asyncio.gather(*(lane(k) for k in range(10)))
        assert await engine.worker_state_ids() == []
    assert len(outcomes) > 20
    for case, out in outcomes:
        assert out.error is None, out.error
        assert out.seed == case[1] and np.abs(out.images - expected[case]).max() < 1e-4, (case, out.seed)
