"""How an engine is set up: one `EngineConfig`, validated once, with the worker grid inside.

`Omni`, `AsyncEngine`, `EngineCore`, the server and the CLI all take the same object, and the
workers receive it whole, so an option is declared, checked and documented in one place.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.contract.input_images import MAX_INPUT_PIXELS

EXECUTORS = ("mp", "inproc")
DTYPES = ("bfloat16", "float16", "float32")
MAX_RANKS_PER_AXIS = 16
MAX_NUM_SEQS = 4096
MAX_WORKER_RESTARTS = 100
SCHEDULING_POLICIES = ("fcfs", "priority", "deadline")
DEADLINE_ADMISSIONS = ("reject", "best_effort")
MAX_AGING_S = 86400.0


class ParallelConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A grid of cfg_parallel_size x pipeline_parallel_size worker ranks."""

    cfg_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Transformer blocks per pipeline stage; None splits them evenly.
    pp_layer_partition: list[int] | None = None

    def validate(self) -> None:
        for name in ("cfg_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANKS_PER_AXIS:
                raise ValueError(
                    f"ParallelConfig.{name} must be an integer in [1, {MAX_RANKS_PER_AXIS}], got {value!r}"
                )
        if self.pp_layer_partition is not None:
            parts = self.pp_layer_partition
            if len(parts) != self.pipeline_parallel_size or any(not isinstance(p, int) or p < 1 for p in parts):
                raise ValueError(
                    "ParallelConfig.pp_layer_partition must list one positive block count per pipeline stage "
                    f"({self.pipeline_parallel_size}), got {parts!r}"
                )

    def validate_layers(self, num_layers: int) -> None:
        """Every stage needs at least one block, and a partition must cover all of them."""
        stages = self.pipeline_parallel_size
        if stages > 1 and num_layers < stages:
            raise ValueError(
                f"ParallelConfig.pipeline_parallel_size must be in [1, {num_layers}] for a {num_layers}-block "
                f"transformer, got {stages}"
            )
        parts = self.pp_layer_partition
        if parts is not None and sum(parts) != num_layers:
            raise ValueError(
                f"ParallelConfig.pp_layer_partition must sum to the transformer's {num_layers} blocks, "
                f"got {parts} (sum {sum(parts)})"
            )

    @property
    def world_size(self) -> int:
        return self.cfg_parallel_size * self.pipeline_parallel_size


class EngineConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything that fixes an engine for its lifetime (per-request choices are SamplingParams)."""

    # A preset name or a diffusers directory; the family comes from its model_index.json.
    model: str = "tiny-qwen-image"
    # Requests that step together (the running set's cap).
    max_num_seqs: int = 8
    parallel_config: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    # "mp": worker processes over ZeroMQ; "inproc": the model runs in the caller's process.
    executor: str = "mp"
    # "cpu", "cuda" (rank r of the worker grid on GPU r, as CUDA_VISIBLE_DEVICES numbers them) or
    # "cuda:N" (one rank, on GPU N); None: "cuda" when a GPU is visible, else "cpu".
    device: str | None = None
    # Weights and activations: "bfloat16", "float16" or "float32"; None: diffusers' default
    # load (float32, what the presets are saved in).
    dtype: str | None = None
    # torch.compile the transformer with dynamic shapes, so a change of batch size (requests
    # joining and leaving) reuses the compiled graph instead of recompiling.
    compile: bool = False
    # Bound on queued requests; more are rejected as overloaded. None: unbounded.
    max_waiting: int | None = None
    # Send step k+1 before step k's results are back. None: on wherever it can help (worker
    # processes without pipeline parallelism).
    async_scheduling: bool | None = None
    # Serve the model through the generic diffusers adapter even where a hand-split family
    # exists (a cross-check of the two paths; the adapter runs neither CFG- nor pipeline-parallel).
    diffusers_adapter: bool = False
    # After a worker crash, start a fresh worker grid (the requests it was running fail, the
    # waiting ones run on the new grid), up to this many crashes in a row with growing waits;
    # 0: a crash ends the engine (EngineDeadError). `stepweave serve` turns it on.
    max_worker_restarts: int = 0
    # Activation memory the running requests may need together, in MiB (each request's need is
    # estimated from the model's shapes and its size: pipelines/memory_estimate.py). Requests
    # wait until they fit; one that could never fit is rejected at submission. None: 80% of what
    # the workers could allocate once the model was loaded.
    memory_budget_mb: int | None = None
    # Requests that may run beyond max_num_seqs, for clients with nothing running: when one
    # client holds every slot, another's request starts at once and the running requests take
    # turns at step boundaries (each step batch still holds at most max_num_seqs; a request that
    # sits a step out keeps its state on the workers). 0: no pausing (pure FCFS within the cap).
    # Not with pipeline parallelism. `stepweave serve` sets 4.
    max_paused: int = 0
    # Pixels (height x width) one input image of a request may have (image-to-image, editing);
    # larger ones are refused at submission.
    max_input_pixels: int = 2048 * 2048
    # MiB of input images the unfinished requests (waiting and running) may hold together; a
    # request that would pass it is refused as overloaded, so a queue of image requests cannot
    # exhaust the engine's memory (each may carry up to 64 MiB). None: no bound.
    max_input_images_mb: int | None = 2048
    # Which requests step next (engine/core/policy.py): "fcfs" (first come, first served, fair
    # between clients); "priority" (SamplingParams.priority, higher first, aged by one level per
    # priority_aging_s seconds of waiting so nothing starves); "deadline" (SamplingParams.deadline_s:
    # least slack first from the cost model; running requests sit out steps for more urgent ones
    # within the max_paused budget, so give it max_paused > 0 to preempt).
    scheduling_policy: str = "fcfs"
    priority_aging_s: float = 10.0
    # "deadline" only: a request that needs longer than its deadline_s even alone is refused at
    # submission ("reject") or runs best effort ("best_effort").
    deadline_admission: str = "reject"
    # The step-time cost model's starting point: a JSON profile (benchmarks/profiles/*.json),
    # "measure" (a few short batches on the workers at start), or None: "measure" under the
    # deadline policy, otherwise nothing (it learns from the batches it runs).
    cost_profile: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EngineConfig.model must be a preset name or a model directory, got {self.model!r}")
        _int_at_least("max_num_seqs", self.max_num_seqs, 1, MAX_NUM_SEQS)
        if not isinstance(self.parallel_config, ParallelConfig):
            raise ValueError(
                f"EngineConfig.parallel_config must be a ParallelConfig, got {type(self.parallel_config).__name__}"
            )
        self.parallel_config.validate()
        if self.executor not in EXECUTORS:
            raise ValueError(f"EngineConfig.executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.executor == "inproc" and self.parallel_config.world_size != 1:
            raise ValueError("executor='inproc' runs a single rank; use executor='mp' for parallel workers")
        if self.device is not None and not _is_device(self.device):
            raise ValueError(f"EngineConfig.device must be null, 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if isinstance(self.device, str) and self.device.startswith("cuda:") and self.parallel_config.world_size > 1:
            raise ValueError(
                f"EngineConfig.device={self.device!r} names one GPU, but the worker grid has "
                f"{self.parallel_config.world_size} ranks; use device='cuda' (rank r on GPU r)"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be null or one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"EngineConfig.compile must be true or false, got {self.compile!r}")
        if self.max_waiting is not None:
            _int_at_least("max_waiting", self.max_waiting, 0, 1 << 30)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(
                f"EngineConfig.async_scheduling must be true, false or null, got {self.async_scheduling!r}"
            )
        if not isinstance(self.diffusers_adapter, bool):
            raise ValueError(f"EngineConfig.diffusers_adapter must be true or false, got {self.diffusers_adapter!r}")
        _int_at_least("max_worker_restarts", self.max_worker_restarts, 0, MAX_WORKER_RESTARTS)
        _int_at_least("max_paused", self.max_paused, 0, MAX_NUM_SEQS)
        _int_at_least("max_input_pixels", self.max_input_pixels, 1, MAX_INPUT_PIXELS)
        if self.max_input_images_mb is not None:
            _int_at_least("max_input_images_mb", self.max_input_images_mb, 64, 1 << 30)
        if self.memory_budget_mb is not None:
            _int_at_least("memory_budget_mb", self.memory_budget_mb, 1, 1 << 40)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"EngineConfig.scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}"
            )
        aging = self.priority_aging_s
        if isinstance(aging, bool) or not isinstance(aging, (int, float)) or not 0 < aging <= MAX_AGING_S:
            raise ValueError(f"EngineConfig.priority_aging_s must be seconds in (0, {MAX_AGING_S:g}], got {aging!r}")
        if self.deadline_admission not in DEADLINE_ADMISSIONS:
            raise ValueError(
                f"EngineConfig.deadline_admission must be one of {DEADLINE_ADMISSIONS}, got {self.deadline_admission!r}"
            )
        if self.cost_profile is not None and (not isinstance(self.cost_profile, str) or not self.cost_profile):
            raise ValueError(
                f"EngineConfig.cost_profile must be null, 'measure' or a JSON profile path, got {self.cost_profile!r}"
            )

    @classmethod
    def of(cls, model: str | EngineConfig | None = None, **options: Any) -> EngineConfig:
        """The front doors' constructor: `Omni("tiny-qwen-image", max_num_seqs=4)` or
        `Omni(EngineConfig(...))`, options overriding the given config; validated."""
        if isinstance(model, EngineConfig):
            config = msgspec.structs.replace(model, **options) if options else model
        else:
            fields = set(cls.__struct_fields__)
            unknown = sorted(set(options) - fields)
            if unknown:
                raise TypeError(f"unknown engine option(s) {unknown}; EngineConfig has {sorted(fields)}")
            if model is not None:
                options["model"] = str(model)
            config = cls(**options)
        if config.parallel_config is None:
            config = msgspec.structs.replace(config, parallel_config=ParallelConfig())
        config.validate()
        return config


def _int_at_least(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"EngineConfig.{name} must be an integer in [{low}, {high}], got {value!r}")


def _is_device(value: Any) -> bool:
    if value in ("cpu", "cuda"):
        return True
    return isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()
