"""The checks a request passes without the model: what a prompt may be, and its parameters.

Clients run them before sending and the engine again at submission, so a malformed request is
refused with an error naming the field wherever it enters.
"""

from __future__ import annotations

from typing import Any, Sequence

from engine.contract.input_images import IMAGE_KEYS, check_input_images, normalize_images
from engine.contract.sampling_params import SamplingParams

# Every input a prompt dict may carry; each model family says which of them it takes.
PROMPT_KEYS = ("prompt", "negative_prompt", "class_label", *IMAGE_KEYS)


def request_fields(prompt: str | dict | None, params: SamplingParams | None) -> tuple[SamplingParams, dict]:
    """Validated params (defaults when None, each field in range) and the prompt's fields."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    return params, normalize_prompt(prompt)


def normalize_prompt(prompt: str | dict | None) -> dict[str, Any]:
    """A string, or a dict with some of PROMPT_KEYS -> every key of PROMPT_KEYS (None if absent);
    input images become arrays within the limits of input_images.py."""
    if isinstance(prompt, str):
        return {key: prompt if key == "prompt" else None for key in PROMPT_KEYS}
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"prompt dict has unknown key(s) {unknown}; allowed: {list(PROMPT_KEYS)}")
        fields = {key: prompt.get(key) for key in PROMPT_KEYS}
        for key in IMAGE_KEYS:
            fields[key] = normalize_images(key, fields[key])
        check_input_images(fields)
        return fields
    raise ValueError(f"prompt must be a string or a dict with keys {list(PROMPT_KEYS)}, got {type(prompt).__name__}")


def pair_prompts(prompts: Any, sampling_params: Any) -> tuple[list, list]:
    """One prompt or many, one SamplingParams for all or one each -> two lists of equal length."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    prompts = list(prompts)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return prompts, [sampling_params] * len(prompts)
    params_list: Sequence = list(sampling_params)
    if len(params_list) != len(prompts):
        raise ValueError(f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts")
    return prompts, list(params_list)
