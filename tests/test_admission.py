"""Who gets the next free slot: clients take turns, and the running set stays within the memory
budget (a request that could never fit is refused at submission)."""

import asyncio

import numpy as np
import pytest

from engine.contract.sampling_params import SamplingParams
from engine.core.request import Request
from engine.core.scheduler import StepScheduler
from tests.test_scheduler import fake_results


def make(request_id, client="", memory=0, steps=3):
    request = Request(
        request_id=request_id,
        params=SamplingParams(num_inference_steps=steps, output_type="np"),
        seed=0,
        arrival_time=0.0,
        client=client,
    )
    request.memory_bytes = memory
    return request


def _np(steps: int, seed: int) -> SamplingParams:
    return SamplingParams(num_inference_steps=steps, seed=seed, output_type="np")


def _admitted(batch) -> list[str]:
    return [n.request_id for n in batch.new]


def test_a_flooding_client_does_not_push_another_clients_request_back():
    s = StepScheduler(max_num_seqs=2)
    for i in range(100):
        s.add_request(make(f"flood-{i}", client="flood"))
    s.add_request(make("polite", client="polite"))
    first = s.schedule(0.0)
    # the flood's head and the polite client's only request share the first two slots
    assert _admitted(first) == ["flood-0", "polite"]
    s.update(fake_results(first, finished={"polite"}), 0.0)
    s.add_request(make("polite-2", client="polite"))
    second = s.schedule(0.0)
    assert _admitted(second) == ["polite-2"]  # next free slot: the polite client's turn again


def test_turns_alternate_between_clients_and_keep_order_within_each():
    s = StepScheduler(max_num_seqs=6)
    for rid, client in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        s.add_request(make(rid, client))
    assert _admitted(s.schedule(0.0)) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_the_running_set_stays_within_the_memory_budget_and_a_big_request_is_not_starved():
    s = StepScheduler(max_num_seqs=8, memory_budget=10)
    s.add_request(make("a", memory=6))
    s.add_request(make("big", memory=9))
    s.add_request(make("small", memory=1))
    b0 = s.schedule(0.0)
    assert _admitted(b0) == ["a"]  # "big" does not fit beside "a"; "small" waits behind it
    s.update(fake_results(b0, finished={"a"}), 0.0)
    b1 = s.schedule(0.0)
    assert _admitted(b1) == ["big", "small"] and s.running_memory == 10
    s.abort("big")
    assert s.running_memory == 1


def test_one_request_alone_always_runs_even_over_the_budget():
    s = StepScheduler(max_num_seqs=8, memory_budget=10)
    s.add_request(make("huge", memory=50))  # the engine refuses these at submission; never deadlock
    assert _admitted(s.schedule(0.0)) == ["huge"]


def test_a_client_with_nothing_running_starts_at_once_and_running_requests_take_turns():
    s = StepScheduler(max_num_seqs=2, max_paused=1)
    for i in range(5):
        s.add_request(make(f"flood-{i}", client="flood", steps=100))
    first = s.schedule(0.0)
    assert _admitted(first) == ["flood-0", "flood-1"]  # one client never runs past the row cap
    s.update(fake_results(first), 0.0)
    s.add_request(make("polite", client="polite", steps=100))
    rows = []
    for _ in range(4):
        batch = s.schedule(0.0)
        rows.append([n.request_id for n in batch.new] + batch.cached)
        assert len(rows[-1]) == 2  # each step batch still holds at most max_num_seqs rows
        s.update(fake_results(batch), 0.0)
    assert len(s.running) == 3 and all("polite" in r for r in rows)  # admitted past the cap; a row every step
    # the flood's two running requests share its remaining row in turn
    assert [r for batch in rows for r in batch if r != "polite"] == ["flood-0", "flood-1"] * 2


async def test_a_request_that_sits_out_steps_gives_the_image_it_gives_alone(qwen_dir):
    import diffusers

    from engine import AsyncEngine
    from tests.conftest import diffusers_reference

    cases = {
        "flood-a": ("flood", {"prompt": "a red barn"}, _np(steps=12, seed=1)),
        "flood-b": ("flood", {"prompt": "a tin roof"}, _np(steps=10, seed=2)),
        "polite": (
            "polite",
            {"prompt": "a stone bridge", "negative_prompt": "fog"},
            _np(steps=8, seed=3),
        ),
    }
    async with AsyncEngine(model=str(qwen_dir), executor="inproc", max_num_seqs=1, max_paused=2) as engine:
        most_running = 0

        async def watch():
            nonlocal most_running
            while True:
                most_running = max(most_running, len(engine.core.scheduler.running))
                await asyncio.sleep(0.002)

        async def run(request_id):
            client, prompt, params = cases[request_id]
            outputs = [o async for o in engine.generate(prompt, params, request_id=request_id, client=client)]
            return outputs[-1]

        watcher = asyncio.ensure_future(watch())
        results = dict(zip(cases, await asyncio.gather(*(run(rid) for rid in cases))))
        watcher.cancel()
        assert most_running == 2  # one row per step, two requests taking turns
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir))
    for request_id, (_, prompt, params) in cases.items():
        assert results[request_id].error is None
        expected = diffusers_reference(pipe, prompt, params, size=(64, 64))
        np.testing.assert_allclose(results[request_id].images, expected, atol=1e-4)


@pytest.fixture(scope="module")
def small_budget_omni(qwen_dir):
    from engine import Omni

    with Omni(model=str(qwen_dir), executor="inproc", memory_budget_mb=64) as omni:
        yield omni


def test_a_request_that_could_never_fit_is_refused_at_submission(small_budget_omni):
    big, ok = small_budget_omni.generate(
        ["a wide panorama", "a small lighthouse"],
        [SamplingParams(height=1024, width=1024), SamplingParams(num_inference_steps=2, seed=1, output_type="np")],
        use_tqdm=False,
    )
    assert "1024x1024 needs about" in big.error and "budget of 64 MiB (memory_budget_mb)" in big.error, big.error
    assert ok.error is None and np.asarray(ok.images).shape == (1, 64, 64, 3)


def test_the_default_budget_comes_from_the_workers_free_memory(qwen_dir):
    from engine import Omni

    with Omni(model=str(qwen_dir), executor="inproc") as omni:
        budget = omni.core.scheduler.memory_budget
        free = omni.core.executor.worker_info[0]["free_memory_bytes"]
        assert budget is not None and budget == int(0.8 * free)
