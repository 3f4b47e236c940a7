"""SamplingParams validation names the field and the allowed range."""

import msgspec
import pytest

from engine.contract.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, r"num_inference_steps must be an integer in \[1, 1000\]"),
        ({"num_inference_steps": 2.5}, r"num_inference_steps must be an integer"),
        ({"true_cfg_scale": float("nan")}, r"true_cfg_scale must be a number in \[0.0, 100.0\]"),
        ({"guidance_scale": -1}, r"guidance_scale must be a number"),
        ({"height": 8}, r"height must be an integer in \[16, 4096\]"),
        ({"width": "64"}, r"width must be an integer"),
        ({"seed": -3}, r"seed must be an integer in \[0, "),
        ({"output_type": "jpeg"}, r"output_type must be one of"),
        ({"scheduler": "not a class"}, r"scheduler must be a diffusers scheduler class name"),
        ({"scheduler_config": [1]}, r"scheduler_config must be a mapping"),
        ({"cfg_normalize": "yes"}, r"cfg_normalize must be"),
        ({"priority": 1.5}, r"priority must be an integer in \[-1000000, 1000000\]"),
        ({"priority": True}, r"priority must be an integer"),
        ({"deadline_s": 0}, r"deadline_s must be seconds in \(0, 604800\] or null"),
        ({"deadline_s": -2.0}, r"deadline_s must be seconds in \(0, "),
        ({"deadline_s": float("inf")}, r"deadline_s must be seconds"),
    ],
)
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


def test_defaults_are_valid_and_roundtrip_msgpack():
    params = SamplingParams(
        num_inference_steps=7,
        seed=3,
        scheduler="UniPCMultistepScheduler",
        scheduler_config={"solver_order": 1},
        priority=-2,
        deadline_s=1.5,
    )
    params.validate()
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params
