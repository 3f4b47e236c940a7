"""The memory budget counts a video's frames: its estimate grows with the latent frames' tokens
and the decoded frames, admission never runs more videos at once than fit, and a video that
could never fit is refused at submission with the limit named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import Omni, SamplingParams
from pipelines.memory_estimate import read_vae_config, request_bytes

MIB = 2**20


@pytest.fixture(scope="module")
def wan21(_preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    return export_preset("tiny-wan21", tmp_path_factory.mktemp("wan") / "tiny-wan21", preset_size=True)


def _configs(path):
    return json.loads((path / "transformer" / "config.json").read_text()), read_vae_config(path)


def test_a_videos_estimate_counts_its_latent_frames_and_decoded_frames(wan21):
    transformer, vae = _configs(wan21)
    image = request_bytes(480, 832, transformer, vae)
    one = request_bytes(480, 832, transformer, vae, frames=1)
    short = request_bytes(480, 832, transformer, vae, frames=5)
    long = request_bytes(480, 832, transformer, vae, frames=81)
    assert image <= one < short < long
    # 81 frames are 21 latent frames of 1560 tokens each, and attention grows with their square;
    # one frame's peak is its decode
    assert long > 50 * one
    frames = [request_bytes(32, 32, transformer, vae, frames=f) for f in (1, 9, 41, 81)]
    assert frames == sorted(frames) and len(set(frames)) == 4


def test_admission_runs_only_the_videos_that_fit_and_refuses_one_that_never_could(wan21):
    transformer, vae = _configs(wan21)
    need = request_bytes(32, 32, transformer, vae, frames=9)
    budget_mb = int(2.5 * need / MIB)  # two 9-frame videos fit at once, three do not
    with Omni(model=str(wan21), executor="inproc", max_num_seqs=8, memory_budget_mb=budget_mb) as omni:
        core = omni.core
        with pytest.raises(ValueError) as excinfo:
            core.make_request("a long video", SamplingParams(num_frames=1025))
        message = str(excinfo.value)
        assert "SamplingParams.num_frames x height x width = 1025x32x32 needs about" in message
        assert f"budget of {budget_mb} MiB (memory_budget_mb)" in message
        requests = [
            core.make_request(f"clip {i}", SamplingParams(num_inference_steps=3, seed=i, output_type="np"))
            for i in range(3)
        ]
        assert all(r.memory_bytes == need for r in requests)
        for request in requests:
            core.add_request(request)
        most, finished = 0, {}
        while core.has_work():
            for output in core.step():
                if output.finished:
                    finished[output.request_id] = output
            most = max(most, len(core.scheduler.running))
            assert core.scheduler.running_memory <= budget_mb * MIB
        assert most == 2
        alone = omni.generate(
            ["clip 2"], SamplingParams(num_inference_steps=3, seed=2, output_type="np"), use_tqdm=False
        )
    assert all(o.error is None and o.frames.shape == (9, 32, 32, 3) for o in finished.values())
    np.testing.assert_allclose(finished[requests[2].request_id].frames, alone[0].frames, atol=1e-4)
