"""Omni: the offline front door. Give it prompts, get images back in input order.

Like vLLM's `LLM.generate`, one call submits every prompt at once and lets continuous batching
interleave them; a bad prompt or parameter set becomes an output with `error` set while the
others run. A prompt with `num_images_per_prompt=N` runs as N requests (seeds seed..seed+N-1)
and comes back as one output with N images.
"""

from __future__ import annotations

from typing import Sequence

from engine.contract.config import EngineConfig
from engine.contract.outputs import RequestOutput, failed_output
from engine.contract.request_fields import normalize_prompt, pair_prompts
from engine.contract.sampling_params import SamplingParams
from engine.core.engine_core import EngineCore
from engine.generation_info import attach_generation_info
from engine.image_fan_out import join_outputs, split_images
from engine.progress import GenerateProgress


class Omni:
    def __init__(self, model: str | EngineConfig = "tiny-qwen-image", **options):
        """`model` is a preset name, a diffusers directory or an EngineConfig; `options` are
        EngineConfig fields (max_num_seqs, parallel_config, executor, device, ...)."""
        config = EngineConfig.of(model, **options)
        self.model = config.model  # as the caller named it (the core holds the resolved directory)
        self.core = EngineCore(config)

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in input order. The progress bar counts steps for one prompt and finished
        prompts for several."""
        prompts, params_list = pair_prompts(prompts, sampling_params)
        results: list[RequestOutput | None] = [None] * len(prompts)
        parts: dict[int, list[RequestOutput | None]] = {}  # prompt index -> its images' final outputs
        where: dict[str, tuple[int, int]] = {}  # request id -> (prompt index, image index)
        submitted: list[tuple[int, SamplingParams]] = []
        fields: dict[int, dict] = {}  # prompt index -> its normalized fields (input images as arrays, once)
        steps = 0  # what the bar counts: the steps each request really runs
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                try:
                    checked = _checked(params)
                    fields[i] = normalize_prompt(prompt)
                    requests = [self.core.make_request(fields[i], p) for p in split_images(checked)]
                except ValueError as exc:
                    results[i] = failed_output(f"omni-rejected-{i}", f"ValueError: {exc}")
                    continue
                parts[i] = [None] * len(requests)
                for k, request in enumerate(requests):
                    steps += request.num_steps
                    where[request.request_id] = (i, k)
                    self.core.add_request(request)
                submitted.append((i, checked))
            bar = GenerateProgress(len(submitted), steps, use_tqdm)
            self._run(where, parts, bar)
        except BaseException:
            for request_id in list(where):
                self.core.abort(request_id)
            raise
        for i, outputs in parts.items():
            params = params_list[i] if params_list[i] is not None else SamplingParams()
            output = join_outputs(outputs[0].request_id, outputs, params.output_type)  # type: ignore[arg-type]
            attach_generation_info(output, fields[i], params, self.model)
            results[i] = output
        return results  # type: ignore[return-value]

    def _run(self, where: dict, parts: dict, bar: GenerateProgress) -> None:
        try:
            while where:
                for output in self.core.step():
                    if output.request_id not in where:
                        continue
                    bar.step(output.request_id, output.step)
                    if output.finished:
                        i, k = where.pop(output.request_id)
                        parts[i][k] = output
                        if all(part is not None for part in parts[i]):
                            bar.prompt_done()
        finally:
            bar.close()

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _checked(params: SamplingParams | None) -> SamplingParams:
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    return params
