"""Omni: the offline front door. Give it prompts, get images back in input order.

Like vLLM's `LLM.generate`, one call submits every prompt at once and lets continuous batching
interleave them; a bad prompt or parameter set becomes an output with `error` set while the
others run.
"""

from __future__ import annotations

from typing import Sequence

from engine.config import ParallelConfig
from engine.core import EngineCore
from engine.outputs import RequestOutput, failed_output
from engine.sampling_params import SamplingParams


class Omni:
    def __init__(
        self,
        model: str = "tiny-qwen-image",
        max_num_seqs: int = 8,
        parallel_config: ParallelConfig | None = None,
        executor: str = "mp",
        device: str | None = None,
        async_scheduling: bool | None = None,
    ):
        self.core = EngineCore(
            model,
            max_num_seqs=max_num_seqs,
            parallel_config=parallel_config,
            executor=executor,
            device=device,
            async_scheduling=async_scheduling,
        )

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


def pair_prompts(prompts, sampling_params) -> tuple[list, list]:
    """One prompt or many, one SamplingParams for all or one each -> two lists of equal length."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    prompts = list(prompts)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return prompts, [sampling_params] * len(prompts)
    params_list = list(sampling_params)
    if len(params_list) != len(prompts):
        raise ValueError(f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts")
    return prompts, params_list


def progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
