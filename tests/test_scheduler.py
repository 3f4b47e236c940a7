"""The step scheduler, driven with fake results (no model, no workers)."""

import numpy as np
import pytest

from engine.contract.errors import OverloadedError
from engine.contract.messages import StepOutput, StepResults
from engine.contract.sampling_params import SamplingParams
from engine.core.request import Request
from engine.core.scheduler import StepScheduler


def make(request_id, steps=3):
    return Request(
        request_id=request_id,
        params=SamplingParams(num_inference_steps=steps, output_type="np"),
        seed=0,
        arrival_time=0.0,
    )


def fake_results(batch, finished=(), errors=()):
    outputs = []
    for rid in [n.request_id for n in batch.new] + batch.cached:
        if rid in errors:
            outputs.append(StepOutput(request_id=rid, step=1, num_steps=3, finished=True, error="boom"))
        elif rid in finished:
            outputs.append(
                StepOutput(request_id=rid, step=3, num_steps=3, finished=True, image=np.zeros((1, 2, 2, 3), np.float32))
            )
        else:
            outputs.append(StepOutput(request_id=rid, step=1, num_steps=3))
    return StepResults(step_id=batch.step_id, outputs=outputs)


def test_admits_up_to_max_num_seqs_and_new_requests_join_between_steps():
    s = StepScheduler(max_num_seqs=2)
    for rid in "abc":
        s.add_request(make(rid))
    b0 = s.schedule(0.0)
    assert [n.request_id for n in b0.new] == ["a", "b"] and b0.cached == []
    s.update(fake_results(b0, finished={"a"}), 1.0)
    b1 = s.schedule(1.0)
    assert [n.request_id for n in b1.new] == ["c"] and b1.cached == ["b"]


def test_final_output_has_images_and_metrics():
    s = StepScheduler(max_num_seqs=4)
    s.add_request(make("a"))
    b = s.schedule(0.0)
    (out,) = s.update(fake_results(b, finished={"a"}), 2.0)
    assert out.finished and out.error is None and out.images.shape == (1, 2, 2, 3)
    assert out.metrics.latency_s >= 0 and not s.has_unfinished()


def test_abort_waiting_and_running_drops_worker_state_once():
    s = StepScheduler(max_num_seqs=1)
    s.add_request(make("run"))
    s.add_request(make("wait"))
    b0 = s.schedule(0.0)
    assert s.abort("wait").error == "request aborted"
    assert s.abort("run").finished
    # results for the aborted request are ignored, and the next batch tells workers to drop it
    assert s.update(fake_results(b0), 1.0) == []
    b1 = s.schedule(1.0)
    assert b1.drop == ["run"] and b1.new == [] and b1.cached == []
    assert s.abort("unknown") is None
    assert not s.has_unfinished()


def test_one_failure_does_not_end_the_others():
    s = StepScheduler(max_num_seqs=4)
    for rid in "ab":
        s.add_request(make(rid))
    b = s.schedule(0.0)
    outs = {o.request_id: o for o in s.update(fake_results(b, errors={"a"}), 1.0)}
    assert outs["a"].error == "boom" and outs["a"].finished
    assert outs["b"].error is None and not outs["b"].finished
    assert s.schedule(1.0).cached == ["b"]


def test_batches_in_flight_hold_disjoint_requests():
    s = StepScheduler(max_num_seqs=8, max_batches_in_flight=2)
    s.add_request(make("a"))
    b0 = s.schedule(0.0)
    s.add_request(make("b"))
    b1 = s.schedule(0.0)
    assert [n.request_id for n in b0.new] == ["a"] and [n.request_id for n in b1.new] == ["b"]
    assert s.schedule(0.0) is None  # two in flight
    s.update(fake_results(b0), 1.0)
    assert s.schedule(1.0).cached == ["a"]


def test_missing_result_fails_the_request():
    s = StepScheduler()
    s.add_request(make("a"))
    b = s.schedule(0.0)
    (out,) = s.update(StepResults(step_id=b.step_id, outputs=[]), 1.0)
    assert out.error == "worker returned no result"


def test_bounded_waiting_queue_rejects_when_full():
    s = StepScheduler(max_num_seqs=1, max_waiting=1)
    s.add_request(make("a"))
    with pytest.raises(OverloadedError, match="max_waiting=1"):
        s.add_request(make("b"))


def test_input_images_held_by_unfinished_requests_are_bounded():
    """A queue of image requests cannot exhaust the engine's memory: the input images of waiting
    and running requests stay within max_input_bytes, and a request that ends frees its share."""
    mib = 1 << 20

    def with_image(request_id):
        request = make(request_id)
        request.image = np.zeros((512, 512, 4), np.uint8)  # 1 MiB
        return request

    s = StepScheduler(max_num_seqs=1, max_input_bytes=3 * mib)
    for rid in "abc":
        s.add_request(with_image(rid))
    full = r"hold 3 MiB of input images and this one 1 MiB \(max_input_images_mb=3\)"
    with pytest.raises(OverloadedError, match=full):
        s.add_request(with_image("d"))
    s.add_request(make("plain"))  # no images: not bounded by them
    s.abort("c")  # waiting
    s.add_request(with_image("d"))
    batch = s.schedule(now=0.0)
    (running,) = [n.request_id for n in batch.new]
    s.update(fake_results(batch, finished={running}), now=1.0)
    assert s.input_bytes == 2 * mib
    s.add_request(with_image("e"))
    with pytest.raises(OverloadedError):
        s.add_request(with_image("f"))
    assert s.input_bytes == 3 * mib
    s.fail_all("workers gone")
    assert s.input_bytes == 0


def test_async_scheduling_overlaps_steps_and_reconciles_errors():
    s = StepScheduler(max_num_seqs=4, max_batches_in_flight=2, overlap=True)
    s.add_request(make("a", steps=3))
    s.add_request(make("b", steps=3))
    b0 = s.schedule(0.0)
    b1 = s.schedule(0.0)  # step k+1 goes out before step k's results
    assert [n.request_id for n in b0.new] == ["a", "b"] and b1.cached == ["a", "b"]
    assert s.schedule(0.0) is None  # two batches in flight
    s.update(fake_results(b0, errors={"b"}), 1.0)  # b fails at step 1 while its step 2 is in flight
    b2 = s.schedule(1.0)
    assert b2.cached == ["a"] and b2.drop == ["b"]  # a's last step is planned; b's state is dropped
    assert [o.request_id for o in s.update(fake_results(b1), 2.0)] == ["a"]  # b's late result is ignored
    assert s.schedule(2.0) is None  # all of a's steps are planned: nothing more to send
    (final,) = s.update(fake_results(b2, finished={"a"}), 3.0)
    assert final.request_id == "a" and final.finished and not s.has_work()
