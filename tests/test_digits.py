"""digits-qwen-image draws the digit its prompt names: scored by a classifier fitted on the real
digits, with default settings, co-batched with staggered joins, through worker processes, and
equal to diffusers' QwenImagePipeline on the exported directory."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest

from engine import Omni, SamplingParams
from pipelines.presets import export_preset
from pipelines.presets.digit_classifier import DigitClassifier
from pipelines.presets.digits_data import SIDE, prompt_for, prompts_for
from tests.conftest import diffusers_reference, run_staggered

SEEDS = (0, 1, 2)
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


@pytest.fixture(scope="module")
def omni():
    """The engine with default settings: worker processes, the preset's own size and schedule."""
    with Omni(model="digits-qwen-image") as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipe = diffusers.QwenImagePipeline.from_pretrained(
        str(export_preset("digits-qwen-image", tmp_path_factory.mktemp("digits")))
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _accuracy(classifier, images, digits) -> float:
    return float((classifier.predict(np.concatenate(images)) == np.asarray(digits)).mean())


def test_classifier_reads_the_dataset_drawn_as_the_preset_draws_it(classifier):
    from pipelines.presets.digits_data import load_digits_8x8, to_pixels

    images, labels = load_digits_8x8()
    pixels = to_pixels(images[::10]).permute(0, 2, 3, 1).numpy() * 0.5 + 0.5  # as the pipeline outputs them
    assert _accuracy(classifier, [pixels], labels[::10]) > 0.97


def test_default_settings_draw_the_named_digit(omni, classifier):
    digits = [d for d in range(10) for _ in SEEDS]
    prompts = [prompt_for(d) for d in digits]
    params = [SamplingParams(seed=s, output_type="np") for _ in range(10) for s in SEEDS]
    outputs = omni.generate(prompts, params, use_tqdm=False)
    assert all(o.error is None for o in outputs)
    assert outputs[0].images.shape == (1, SIDE, SIDE, 3)
    assert _accuracy(classifier, [o.images for o in outputs], digits) >= MIN_ACCURACY


def test_every_trained_phrasing_names_the_digit(omni, classifier):
    # "the number 7", "7", ...: every phrasing the preset was trained on names the digit.
    digits = [d for d in range(10) for _ in prompts_for(d)]
    prompts = [p for d in range(10) for p in prompts_for(d)]
    params = SamplingParams(seed=5, output_type="np")
    outputs = omni.generate(prompts, params, use_tqdm=False)
    assert _accuracy(classifier, [o.images for o in outputs], digits) >= MIN_ACCURACY


def test_co_batched_staggered_joins_draw_digits_and_match_diffusers(omni, reference, classifier):
    """Different digits, step counts, seeds and CFG scales join the running batch at different
    steps; each output equals diffusers on the exported directory and shows its digit."""
    cases = []
    for i, digit in enumerate(range(10)):
        for seed in SEEDS:
            cfg = (None, 2.0, 4.0)[seed]
            prompt = {"prompt": prompt_for(digit), "negative_prompt": "" if cfg else None}
            params = SamplingParams(
                num_inference_steps=(12, 20, 28)[(i + seed) % 3], true_cfg_scale=cfg, seed=seed, output_type="np"
            )
            cases.append((2 * i + seed, prompt, params))
    core = omni.core
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    images = []
    for (_, request), (_, prompt, params) in zip(requests, cases):
        output = finished[request.request_id]
        assert output.error is None, output.error
        expected = diffusers_reference(reference, prompt, params, size=(SIDE, SIDE))
        diff = float(np.abs(output.images - expected).max())
        assert diff < 1e-4, f"max abs diff {diff} for {prompt} {params}"
        images.append(output.images)
    assert _accuracy(classifier, images, [d for d in range(10) for _ in SEEDS]) >= MIN_ACCURACY
