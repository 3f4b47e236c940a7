"""The priority and deadline policies and the cost model, driven with fake results (no model)."""

import json

import pytest

from engine.contract.errors import DeadlineUnmeetableError
from engine.contract.sampling_params import SamplingParams
from engine.core.cost_model import FEATURES, CostModel, RequestShape, batch_features
from engine.core.policy import make_policy
from engine.core.request import Request
from engine.core.scheduler import StepScheduler
from tests.fake_workers import FakeWorkers, drive


def make(request_id, steps=3, arrival=0.0, priority=0, deadline_s=None):
    params = SamplingParams(num_inference_steps=steps, output_type="np", priority=priority, deadline_s=deadline_s)
    return Request(request_id=request_id, params=params, seed=0, arrival_time=arrival, shape=RequestShape(rows=1))


def one_second_steps() -> CostModel:
    """Every step batch takes 1 s, whatever is in it (as `drive` runs them)."""
    return CostModel({"batch": 1.0})


# -- priority ---------------------------------------------------------------------------------------
def test_priority_admits_higher_first_and_fcfs_within_a_level():
    s = StepScheduler(max_num_seqs=1, policy=make_policy("priority"))
    arrivals = [(0.0, make("low", 1, priority=0)), (0.0, make("high", 1, priority=5))]
    arrivals += [(0.0, make("mid-a", 1, priority=2)), (0.0, make("mid-b", 1, priority=2))]
    _, batches, _ = drive(s, arrivals)
    assert batches == [["high"], ["mid-a"], ["mid-b"], ["low"]]


def test_priority_aging_bound_under_a_flood_of_higher_priority():
    """A priority-0 request runs before every priority-5 request that arrives more than
    5 * aging_s after it, however many keep coming (the documented bound)."""
    aging = 1.0
    s = StepScheduler(max_num_seqs=1, policy=make_policy("priority", priority_aging_s=aging))
    flood = [(0.5 * i, make(f"high-{i}", 1, arrival=0.5 * i, priority=5)) for i in range(60)]
    finished, batches, _ = drive(s, [(0.0, make("low", 1, priority=0)), *flood])
    order = [ids[0] for ids in batches]
    before_low = order[: order.index("low")]
    assert before_low, "the flood should go first for a while"
    assert all(int(rid.split("-")[1]) * 0.5 <= 5 * aging for rid in before_low)
    assert finished["low"] < 60 * 0.5  # well before the flood ends


def test_priority_preempts_within_the_paused_budget():
    s = StepScheduler(max_num_seqs=1, max_paused=1, policy=make_policy("priority"))
    workers = FakeWorkers()
    s.add_request(make("low", 5, priority=0))
    b0 = s.schedule(0.0)
    s.update(workers.run(b0), 1.0)
    s.add_request(make("high", 2, arrival=1.0, priority=3))
    b1 = s.schedule(1.0)
    assert [n.request_id for n in b1.new] == ["high"] and b1.cached == [] and b1.drop == []
    assert "low" in workers.state  # paused, its state kept


# -- deadline ---------------------------------------------------------------------------------------
def test_deadline_runs_earliest_deadline_first():
    s = StepScheduler(max_num_seqs=1, policy=make_policy("deadline", one_second_steps()))
    arrivals = [(0.0, make("loose", 2, deadline_s=100.0)), (0.0, make("tight", 2, deadline_s=3.0))]
    arrivals.append((0.0, make("none", 2)))
    finished, batches, _ = drive(s, arrivals)
    assert [b[0] for b in batches] == ["tight", "tight", "loose", "loose", "none", "none"]
    assert finished["tight"] <= 3.0


def test_preemption_keeps_state_and_resumes_at_the_right_step():
    s = StepScheduler(max_num_seqs=1, max_paused=1, policy=make_policy("deadline", one_second_steps()))
    arrivals = [(0.0, make("long", 6, deadline_s=60.0)), (2.0, make("urgent", 2, arrival=2.0, deadline_s=3.0))]
    finished, batches, workers = drive(s, arrivals)
    assert [b[0] for b in batches] == ["long", "long", "urgent", "urgent", "long", "long", "long", "long"]
    assert finished["urgent"] == 4.0 and finished["long"] == 8.0
    # the paused request continued from its third step, on the state it had
    assert workers.steps_run["long"] == [1, 2, 3, 4, 5, 6]


def test_without_a_paused_budget_nothing_is_preempted():
    s = StepScheduler(max_num_seqs=1, max_paused=0, policy=make_policy("deadline", one_second_steps()))
    arrivals = [(0.0, make("long", 4, deadline_s=60.0)), (1.0, make("urgent", 1, arrival=1.0, deadline_s=2.0))]
    _, batches, _ = drive(s, arrivals)
    assert [b[0] for b in batches] == ["long"] * 4 + ["urgent"]


def test_rows_per_step_shrink_when_batching_would_make_the_urgent_one_miss():
    # Each row adds 1 s to a step: running both, the urgent request's 2 steps take 4 s (> 3 s).
    cost = CostModel({"rows": 1.0})
    s = StepScheduler(max_num_seqs=2, policy=make_policy("deadline", cost))
    s.add_request(make("urgent", 2, deadline_s=3.0))
    s.add_request(make("loose", 2, deadline_s=100.0))
    batch = s.schedule(0.0)
    assert [n.request_id for n in batch.new] == ["urgent"]
    # with time to spare, both run together
    s2 = StepScheduler(max_num_seqs=2, policy=make_policy("deadline", cost))
    s2.add_request(make("a", 2, deadline_s=10.0))
    s2.add_request(make("b", 2, deadline_s=10.0))
    assert len(s2.schedule(0.0).new) == 2


def test_admission_rejects_a_deadline_it_cannot_meet_even_alone():
    s = StepScheduler(max_num_seqs=4, policy=make_policy("deadline", one_second_steps()))
    with pytest.raises(DeadlineUnmeetableError, match=r"deadline_s=2 cannot be met: .* about 5.00 s .*5 steps"):
        s.add_request(make("slow", 5, deadline_s=2.0))
    assert not s.has_unfinished()
    s.add_request(make("ok", 5, deadline_s=5.0))  # exactly enough
    # before the cost model knows anything, nothing is refused
    fresh = StepScheduler(policy=make_policy("deadline", CostModel()))
    fresh.add_request(make("slow", 5, deadline_s=2.0))


def test_best_effort_admission_runs_it_after_the_ones_that_can_make_it():
    policy = make_policy("deadline", one_second_steps(), deadline_admission="best_effort")
    s = StepScheduler(max_num_seqs=1, policy=policy)
    arrivals = [(0.0, make("hopeless", 2, deadline_s=1.0)), (0.0, make("fine", 2, deadline_s=50.0))]
    finished, batches, _ = drive(s, arrivals)
    assert [b[0] for b in batches] == ["fine", "fine", "hopeless", "hopeless"]
    assert set(finished) == {"hopeless", "fine"}


def test_best_effort_requests_do_not_starve():
    """A request without a deadline outranks every request arriving more than horizon_s later."""
    policy = make_policy("deadline", one_second_steps())
    policy.horizon_s = 10.0
    s = StepScheduler(max_num_seqs=1, policy=policy)
    flood = [(1.0 * i, make(f"d-{i}", 1, arrival=1.0 * i, deadline_s=30.0)) for i in range(60)]
    finished, batches, _ = drive(s, [(0.0, make("background", 1)), *flood])
    order = [b[0] for b in batches]
    assert all(int(rid.split("-")[1]) <= 10 for rid in order[: order.index("background")])
    assert finished["background"] < 30


def test_abort_of_a_paused_request_frees_its_worker_state():
    s = StepScheduler(max_num_seqs=1, max_paused=1, policy=make_policy("deadline", one_second_steps()))
    workers = FakeWorkers()
    s.add_request(make("long", 6, deadline_s=60.0))
    s.update(workers.run(s.schedule(0.0)), 1.0)
    s.add_request(make("urgent", 3, arrival=1.0, deadline_s=4.0))
    b1 = s.schedule(1.0)
    assert b1.cached == [] and "long" in workers.state  # long is paused
    s.update(workers.run(b1), 2.0)
    assert s.abort("long").error == "request aborted"
    b2 = s.schedule(2.0)
    assert b2.drop == ["long"] and b2.cached == ["urgent"]
    workers.run(b2)
    assert "long" not in workers.state


def test_late_waiting_requests_move_behind_the_ones_that_can_still_make_it():
    s = StepScheduler(max_num_seqs=1, policy=make_policy("deadline", one_second_steps()))
    arrivals = [(0.0, make("first", 4, deadline_s=100.0)), (0.0, make("early", 3, deadline_s=5.0))]
    arrivals.append((0.0, make("later", 3, deadline_s=9.0)))
    finished, batches, _ = drive(s, arrivals)
    # early (due 5 s) runs at once; "later" then still fits by 9 s; "first" runs last, in time
    assert [b[0] for b in batches][:6] == ["early"] * 3 + ["later"] * 3
    assert finished["early"] <= 5 and finished["later"] <= 9 and finished["first"] <= 100


# -- the cost model -----------------------------------------------------------------------------------
def test_cost_model_recovers_a_linear_step_time_and_refreshes_online():
    truth = CostModel({"batch": 0.02, "rows": 0.01, "image_ktokens": 0.05, "decode_ktokens": 0.3})
    model = CostModel()
    for rows in range(1, 9):
        for tokens in (256, 1024, 4096):
            shapes = [RequestShape(rows=2, image_tokens=tokens, text_tokens=16)] * rows
            for finishing in (0, 1):
                features = batch_features(shapes, 0, shapes[:finishing])
                model.observe(features, truth.predict(features))
    model.refit()
    for rows, tokens in ((3, 2048), (8, 512)):
        shapes = [RequestShape(rows=2, image_tokens=tokens, text_tokens=16)] * rows
        assert model.step_time(shapes) == pytest.approx(truth.step_time(shapes), rel=0.05)
    assert (model.coef >= 0).all()


def test_cost_model_profile_roundtrip(tmp_path):
    model = CostModel({"batch": 0.5, "rows": 0.25})
    model.save(tmp_path / "p.json", model="x")
    loaded = CostModel.load(tmp_path / "p.json")
    assert loaded.coef.tolist() == model.coef.tolist() and loaded.known
    (tmp_path / "bad.json").write_text(json.dumps({"coefficients": {"flops": 1}}))
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['flops'\]"):
        CostModel.load(tmp_path / "bad.json")
    assert set(FEATURES) >= {"batch", "rows"}


def test_the_scheduler_refits_the_cost_model_from_measured_batches():
    s = StepScheduler(max_num_seqs=4)
    assert not s.cost_model.known
    finished, _, _ = drive(s, [(0.0, make(f"r{i}", 3)) for i in range(4)], step_s=0.25)
    assert len(finished) == 4 and s.cost_model.observed == 3
    assert s.cost_model.step_time([RequestShape()] * 4) == pytest.approx(0.25, rel=0.05)


def test_a_bad_cost_profile_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"EngineConfig.cost_profile must be 'measure' or a JSON file"):
        CostModel.load(tmp_path / "missing.json")
    (tmp_path / "neg.json").write_text(json.dumps({"coefficients": {"rows": -1}}))
    with pytest.raises(ValueError, match=r"coefficients must be finite and >= 0"):
        CostModel.load(tmp_path / "neg.json")


def test_a_profiled_cost_model_is_not_thrown_off_by_one_odd_batch():
    """A first batch that compiled, or a stall, must not make every deadline look unmeetable."""
    model = CostModel({"batch": 0.01, "rows": 0.002})
    normal = batch_features([RequestShape(rows=2)] * 4)
    model.observe(normal, 5.0)  # a 5 s stall on a batch the profile says takes 26 ms
    assert model.step_time([RequestShape(rows=2)] * 4) < 0.1
    for _ in range(40):
        model.observe(normal, 0.026)
    model.observe(normal, 5.0)
    model.refit()
    assert model.step_time([RequestShape(rows=2)] * 4) == pytest.approx(0.026, rel=0.05)


def test_a_batch_of_two_sizes_pays_for_two_forwards_and_a_decode_call_per_size():
    """The runner runs one forward per image size and one VAE call per size finishing: the
    cost model counts them, and learns their cost from batches that mix sizes."""
    small = RequestShape(rows=2, image_tokens=16, text_tokens=8, forward_key=(64, 64))
    large = RequestShape(rows=2, image_tokens=64, text_tokens=8, forward_key=(128, 128))
    truth = CostModel({"batch": 0.002, "rows": 0.001, "image_ktokens": 0.05, "forwards": 0.006, "decodes": 0.01})
    features = batch_features([small, small, large], 1, [small, small])
    assert features[FEATURES.index("forwards")] == 2 and features[FEATURES.index("decodes")] == 1
    assert truth.step_time([small, large]) - truth.step_time([large]) == pytest.approx(0.002 + 0.0016 + 0.006)
    assert truth.step_time([small, small]) - truth.step_time([small]) == pytest.approx(0.002 + 0.0016)
    model = CostModel()
    for n in range(1, 5):
        for plan in ([small] * n, [large] * n, [small, large] * n):
            for finishing in ([], plan[:1], plan[:2]):
                features = batch_features(plan, 0, finishing)
                model.observe(features, truth.predict(features))
    model.refit()
    assert model.step_time([small, large, large]) == pytest.approx(truth.step_time([small, large, large]), rel=0.02)
    assert model.decode_time(large) == pytest.approx(truth.decode_time(large), rel=0.05)


def test_the_deadline_policy_judges_a_batch_from_when_the_workers_will_start_it():
    """With async scheduling the next batch is chosen while the one before runs. Counting from
    now, taking the long request along looks safe for the urgent one (done at 2 s of its 2.5 s);
    counting from when the running batch ends (1 s), it is not, so the urgent one runs alone."""
    policy = make_policy("deadline", CostModel({"rows": 1.0}))
    s = StepScheduler(max_num_seqs=2, max_batches_in_flight=2, overlap=True, policy=policy)
    s.add_request(make("long", 5, deadline_s=100.0))
    first = s.schedule(0.0)
    s.add_request(make("urgent", 1, deadline_s=2.5))
    second = s.schedule(0.0)
    assert [n.request_id for n in first.new] == ["long"]
    assert [n.request_id for n in second.new] == ["urgent"] and second.cached == []
