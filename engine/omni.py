"""Omni: the offline front door. Give it prompts, get images back in input order.

Like vLLM's `LLM.generate`, one call submits every prompt at once and lets continuous batching
interleave them; a bad prompt or parameter set becomes an output with `error` set while the
others run.
"""

from __future__ import annotations

from typing import Sequence

from engine.contract.config import EngineConfig
from engine.contract.outputs import RequestOutput, failed_output
from engine.contract.request_fields import pair_prompts
from engine.contract.sampling_params import SamplingParams
from engine.core.engine_core import EngineCore
from engine.progress import progress_bar


class Omni:
    def __init__(self, model: str | EngineConfig = "tiny-qwen-image", **options):
        """`model` is a preset name, a diffusers directory or an EngineConfig; `options` are
        EngineConfig fields (max_num_seqs, parallel_config, executor, device, ...)."""
        self.core = EngineCore(EngineConfig.of(model, **options))

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts, params_list = pair_prompts(prompts, sampling_params)
        results: list[RequestOutput | None] = [None] * len(prompts)
        index_of: dict[str, int] = {}
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                request = self.core.make_request(prompt, params)
            except ValueError as exc:
                results[i] = failed_output(f"omni-rejected-{i}", f"ValueError: {exc}")
                continue
            index_of[request.request_id] = i
            self.core.add_request(request)

        bar = progress_bar(len(index_of), use_tqdm)
        try:
            while index_of:
                for output in self.core.step():
                    if output.finished and output.request_id in index_of:
                        results[index_of.pop(output.request_id)] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in list(index_of):
                self.core.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
