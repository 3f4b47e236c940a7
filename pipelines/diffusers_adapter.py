"""The generic diffusers adapter: any pipeline with a transformer and `callback_on_step_end`,
step-batched without splitting it by hand.

Each running request gets a shallow copy of the loaded pipeline, with its own deep copy of the
scheduler, and runs the pipeline's unmodified `__call__` on a thread of its own. The copy's
transformer(s) are proxies: calling one hands the forward to the runner and blocks until the
batched result comes back (`forward_batching`); attribute reads pass through to the real
module. `callback_on_step_end` marks step boundaries: the thread waits there until the engine
schedules its next step, and an abort raises there to unwind it. One engine step for a group of
requests releases their threads, runs every forward they block in (joined where compatible),
and repeats until each thread is back at a boundary or finished; a pipeline that calls the
transformer twice a step simply takes two rounds. Outputs equal diffusers by construction: the
code that runs is diffusers' own, and joined forwards are split back per request.
"""

from __future__ import annotations

import copy
import functools
import inspect
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from engine.contract.input_images import IMAGE_KEYS, as_list, to_pipeline_input
from engine.contract.messages import NewRequest
from engine.contract.sampling_params import MAX_SIDE
from pipelines.forward_batching import TEXT_PADDING, ForwardCall, group_calls, run_group
from pipelines.memory_estimate import latent_frames, read_vae_config, temporal_factor
from pipelines.schedulers import build_scheduler, check_scheduler
from pipelines.step_pipeline import StepPipeline, check_text
from pipelines.tokenizer_lock import SerializedTokenizer, is_tokenizer

# Components that are replaced by proxies: the denoisers (Wan 2.2 has two), whose forwards are
# joined; and the VAE, whose decode calls of requests that finish in the same step are joined.
PROXIED = ("transformer", "transformer_2")
PROXIED_METHODS = {"vae": ("decode",)}
# __call__ arguments the engine sets itself; a request may not pass them in pipeline_args.
ENGINE_CONTROLLED = (
    "generator",
    "latents",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "callback",
    "callback_steps",
    "output_type",
    "num_images_per_prompt",
    "return_dict",
)
# __call__ arguments that come from the prompt dict and SamplingParams.
FROM_REQUEST = {
    "prompt": "the prompt",
    "negative_prompt": "the prompt dict's negative_prompt",
    "num_inference_steps": "SamplingParams.num_inference_steps",
    "height": "SamplingParams.height",
    "width": "SamplingParams.width",
    "num_frames": "SamplingParams.num_frames",
    "true_cfg_scale": "SamplingParams.true_cfg_scale",
    "guidance_scale": "SamplingParams.guidance_scale",
    "strength": "SamplingParams.strength",
    "image": "the prompt dict's image",
    "mask_image": "the prompt dict's mask_image",
}
PIXELS_PER_TOKEN = 16  # VAE 8x times 2x2 patches, the layout of every supported transformer
# The largest of FLUX Kontext's preferred resolutions (1568x672), which `_auto_resize` picks from.
AUTO_RESIZE_PIXELS = 1568 * 672
# Pipelines whose __call__ combines several input images into one result (a list elsewhere is a batch).
MULTI_IMAGE_PIPELINES = frozenset({"QwenImageEditPlusPipeline"})
MAX_IMAGE_TOKENS = 16384  # 2048 x 2048: bounds one request's worker memory when the model sets no limit
MAX_VIDEO_TOKENS = 75600  # Wan 2.1 at 720x1280 with 81 frames (21 latent frames of 45 x 80 tokens)


class _Aborted(BaseException):
    """Raised in a request's thread to unwind it (not an Exception: pipeline code must not catch it)."""


@dataclass(eq=False)
class AdapterState:
    """A running adapter request: its private pipeline copy, its thread and where it stands."""

    request: NewRequest
    pipe: Any
    call_kwargs: dict[str, Any]
    num_steps: int
    step_index: int = 0
    batch_key: tuple = ()  # every adapter request may share a step; forwards group themselves
    thread: threading.Thread | None = None
    resume: threading.Event = field(default_factory=threading.Event)
    aborted: bool = False
    image: np.ndarray | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.image is not None


class _ForwardProxy:
    """Stands in for a module inside one request's pipeline copy: calling it (or one of the
    `methods` named) hands the call to the runner; every other attribute is the module's."""

    def __init__(self, adapter: DiffusersAdapterPipeline, state: AdapterState, module: Any, methods=()):
        self._adapter, self._state, self._module, self._methods = adapter, state, module, methods

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._hand_over(self._module, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            return functools.partial(self._hand_over, getattr(self._module, name))
        return getattr(self._module, name)

    def _hand_over(self, function: Any, /, *args: Any, **kwargs: Any) -> Any:
        call = ForwardCall(function, args, kwargs, padding=self._adapter.text_padding)
        self._adapter.events.put(("forward", self._state, call))
        call.done.wait()
        if self._state.aborted:
            raise _Aborted()
        if call.error is not None:
            raise call.error
        return call.result


class DiffusersAdapterPipeline(StepPipeline):
    name = "diffusers"
    # Input images where the pipeline's __call__ takes them (check_request says which).
    inputs = ("prompt", "negative_prompt", *IMAGE_KEYS)
    supports_cfg_parallel = False
    accepts_pipeline_args = True
    steps_whole_calls = True  # the runner steps it with advance(), not the hand-split contract

    # -- what the engine may check without weights -------------------------------------------
    @classmethod
    def serves(cls, pipeline_class: str, components: dict[str, Any]) -> str | None:
        """Why this adapter cannot serve `pipeline_class` (None when it can)."""
        import diffusers

        pipe_cls = getattr(diffusers, pipeline_class, None)
        if not isinstance(pipe_cls, type) or not issubclass(pipe_cls, diffusers.DiffusionPipeline):
            return "not a diffusers pipeline class"
        if "callback_on_step_end" not in _call_parameters(pipe_cls):
            return "its __call__ takes no callback_on_step_end, so its steps cannot be scheduled"
        if not any(isinstance(components.get(name), list) and components[name][0] for name in PROXIED):
            return f"it has no {' or '.join(PROXIED)} component to batch"
        return None

    @classmethod
    def default_size(cls, transformer_config, preset) -> tuple[int | None, int | None]:
        """A preset's size; otherwise the pipeline's own default (None: not passed)."""
        return preset.get("default_height"), preset.get("default_width")

    @classmethod
    def check_request(cls, info, params, fields) -> None:
        parameters = _call_parameters(info.pipeline_type)
        check_text("prompt", fields["prompt"], required=True)
        if fields["negative_prompt"] is not None and "negative_prompt" not in parameters:
            raise ValueError(f"negative_prompt is not an input of {info.pipeline_class}")
        check_text("negative_prompt", fields["negative_prompt"], required=False)
        _check_image_inputs(info.pipeline_class, parameters, params, fields)
        for side in ("height", "width"):
            value = getattr(params, side)
            if value is not None and side not in parameters:
                raise ValueError(f"SamplingParams.{side} is not an input of {info.pipeline_class}")
            if value is not None and value % PIXELS_PER_TOKEN:
                raise ValueError(
                    f"SamplingParams.{side} must be a multiple of {PIXELS_PER_TOKEN} in [16, {MAX_SIDE}], got {value}"
                )
        area = (params.pipeline_args or {}).get("max_area")
        if area is not None and (isinstance(area, bool) or not isinstance(area, int) or not 256 <= area <= MAX_SIDE**2):
            raise ValueError(f"SamplingParams.pipeline_args['max_area'] must be an integer in [256, {MAX_SIDE**2}]")
        frames = _check_frames(info, params)
        height, width, _ = cls.working_size(info, params, fields)
        if frames is None:
            tokens = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
            limit = int(info.scheduler_config.get("max_image_seq_len") or MAX_IMAGE_TOKENS)
            if tokens > limit:
                given = "" if "max_area" not in parameters else " (the output's area is max_area, diffusers' 1024x1024)"
                raise ValueError(
                    f"SamplingParams.height x width = {height}x{width}{given} gives {tokens} image tokens; this model "
                    f"allows at most {limit} (height/16 * width/16)"
                )
        else:
            depth = latent_frames(frames, read_vae_config(info.path))
            tokens = depth * (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
            if tokens > MAX_VIDEO_TOKENS:
                raise ValueError(
                    f"SamplingParams.num_frames x height x width = {frames}x{height}x{width} gives {tokens} video "
                    f"tokens; at most {MAX_VIDEO_TOKENS} are served (latent frames * height/16 * width/16)"
                )
        for name in params.pipeline_args or {}:
            if name in ENGINE_CONTROLLED:
                raise ValueError(f"SamplingParams.pipeline_args: {name!r} is set by the engine")
            if name in FROM_REQUEST:
                raise ValueError(f"SamplingParams.pipeline_args: {name!r} comes from {FROM_REQUEST[name]}")
            if name not in parameters:
                allowed = sorted(set(parameters) - set(ENGINE_CONTROLLED) - set(FROM_REQUEST) - {"self"})
                raise ValueError(
                    f"SamplingParams.pipeline_args: {info.pipeline_class} takes no argument {name!r}; "
                    f"allowed: {', '.join(allowed)}"
                )

    @classmethod
    def check_scheduler_choice(cls, info, params) -> None:
        check_scheduler(info.scheduler_config, params.scheduler, params.scheduler_config, info.flow)

    @classmethod
    def working_size(cls, info, params, fields) -> tuple[int, int, tuple]:
        """The output size as the pipeline computes it (FLUX Kontext scales height x width to
        `max_area`, keeping their ratio), and the input images' pixels as it encodes them
        (Kontext's `_auto_resize` scales each to a preferred resolution of about 1024x1024)."""
        height = params.height or info.default_height or info.call_default("height") or 1024
        width = params.width or info.default_width or info.call_default("width") or 1024
        parameters, args = _call_parameters(info.pipeline_type), params.pipeline_args or {}
        if "max_area" in parameters:
            area, ratio = args.get("max_area", _default(info.pipeline_type, "max_area")), width / height
            width = round((area * ratio) ** 0.5) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            height = round((area / ratio) ** 0.5) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        resized = "_auto_resize" in parameters and args.get("_auto_resize", True) is not False
        inputs = tuple(AUTO_RESIZE_PIXELS if resized else a.shape[0] * a.shape[1] for a in as_list(fields.get("image")))
        return height, width, inputs

    @classmethod
    def num_steps(cls, info, params) -> int:
        """With `strength` (image-to-image, inpainting) the pipeline skips the first steps of
        its schedule: counted as diffusers' `get_timesteps` counts them. The worker reports the
        pipeline's own count (`_num_timesteps`) once it runs, so a scheduler that counts
        otherwise corrects it."""
        strength = params.strength
        if strength is None and "strength" in _call_parameters(info.pipeline_type):
            strength = float(_default(info.pipeline_type, "strength"))
        if strength is None:
            return params.num_inference_steps
        steps = steps_after_strength(params.num_inference_steps, strength)
        if steps < 1:  # a strength so small that float rounding leaves nothing (diffusers raises)
            raise ValueError(
                f"SamplingParams.strength x num_inference_steps = {strength:g} x {params.num_inference_steps} "
                "leaves no denoising step; raise either"
            )
        return steps

    # -- serving ---------------------------------------------------------------------------
    def __init__(self, pipe: Any, info: Any, device: torch.device):
        if not any(isinstance(getattr(pipe, name, None), torch.nn.Module) for name in PROXIED):
            raise ValueError(f"{type(pipe).__name__} has no {' or '.join(PROXIED)} module to batch")
        super().__init__(pipe, info, device)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.text_padding = TEXT_PADDING.get(type(pipe).__name__, [])
        self._parameters = _call_parameters(type(pipe))
        # Forwards the requests asked for, and the joined forwards that ran them (calls/forwards
        # is the mean join width, for tests and benchmarks).
        self.forward_calls = 0
        self.forwards_run = 0
        # One lock per loaded tokenizer, shared by every request's pipeline copy.
        self._tokenizer_locks = {
            name: threading.Lock() for name, value in vars(self.pipe).items() if is_tokenizer(value)
        }

    def parameter_count(self) -> int:
        modules = [getattr(self.pipe, name, None) for name in PROXIED]
        return sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())

    def prepare_encode(self, request: NewRequest) -> AdapterState:
        params = request.params
        pipe = copy.copy(self.pipe)  # __call__ writes per-call attributes on the pipeline object
        if params.scheduler is None and not params.scheduler_config:
            scheduler = copy.deepcopy(self.pipe.scheduler)
        else:
            scheduler = build_scheduler(
                self.info.scheduler_config, params.scheduler, params.scheduler_config, self.info.flow
            )
        pipe.__dict__["scheduler"] = scheduler  # past DiffusionPipeline.__setattr__, which edits the config
        state = AdapterState(request, pipe, self._call_kwargs(request), params.num_inference_steps)
        for name in PROXIED:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                pipe.__dict__[name] = _ForwardProxy(self, state, module)
        for name, methods in PROXIED_METHODS.items():
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                pipe.__dict__[name] = _ForwardProxy(self, state, module, methods)
        for name, lock in self._tokenizer_locks.items():  # request threads encode concurrently
            pipe.__dict__[name] = SerializedTokenizer(getattr(self.pipe, name), lock)
        return state

    def _call_kwargs(self, request: NewRequest) -> dict[str, Any]:
        params = request.params
        wanted = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_inference_steps": params.num_inference_steps,
            "height": params.height or self.info.default_height,
            "width": params.width or self.info.default_width,
            "num_frames": params.num_frames or self.info.default_num_frames,
            "true_cfg_scale": params.true_cfg_scale,
            "guidance_scale": params.guidance_scale,
            "strength": params.strength,
            "image": to_pipeline_input(request.image),
            "mask_image": to_pipeline_input(request.mask_image),
        }
        kwargs = {k: v for k, v in wanted.items() if v is not None and k in self._parameters}
        kwargs.update(params.pipeline_args or {})
        kwargs["generator"] = self.new_generator(request)
        return kwargs

    def advance(self, states: Sequence[AdapterState]) -> list[tuple[str, Any]]:
        """One step of every request in `states`: ("progress", None), ("finished", image) or
        ("failed", exception) each, in order."""
        for state in states:
            if state.thread is None:
                name = f"stepweave-request-{state.request_id}"
                state.thread = threading.Thread(target=self._run, args=(state,), name=name, daemon=True)
                state.thread.start()
            else:
                state.resume.set()
        outcomes: dict[int, tuple[str, Any]] = {}
        running, waiting = {id(s) for s in states}, []
        while running:
            kind, state, payload = self.events.get()
            if kind == "forward":
                waiting.append(payload)
            else:
                running.discard(id(state))
                outcomes[id(state)] = (kind, payload)
            if waiting and len(waiting) == len(running):  # every released thread is blocked in a forward
                groups = group_calls(waiting)
                with torch.inference_mode(False), torch.no_grad():
                    for group in groups:
                        run_group(group)
                self.forward_calls += len(waiting)
                self.forwards_run += len(groups)
                waiting = []
        return [outcomes[id(state)] for state in states]

    def release(self, state: Any) -> None:
        """Unwind a request's thread (aborted, failed or dropped) and wait until it has ended."""
        thread = getattr(state, "thread", None)
        if thread is not None and thread.is_alive():
            state.aborted = True
            state.resume.set()
            thread.join(timeout=60)

    # -- the request's thread ----------------------------------------------------------------
    def _run(self, state: AdapterState) -> None:
        try:
            output = state.pipe(
                **state.call_kwargs,
                callback_on_step_end=functools.partial(self._at_step_end, state),
                output_type="np",
                return_dict=True,
            )
            images = getattr(output, "images", None)
            if images is None:  # a video pipeline: (1, frames, H, W, 3)
                images = getattr(output, "frames", None)
            if images is None:
                raise ValueError(f"{type(self.pipe).__name__} returned neither images nor video frames")
            images = np.asarray(images, dtype=np.float32)
            if not np.isfinite(images).all():
                raise FloatingPointError("the image is not finite")
        except _Aborted:
            return  # the runner dropped this request and waits for the thread to end
        except BaseException as exc:
            self.events.put(("failed", state, exc))
            return
        state.step_index = state.num_steps
        state.image = images[:1]
        self.events.put(("finished", state, state.image))

    def _at_step_end(self, state: AdapterState, pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
        state.step_index = index + 1
        total = getattr(pipe, "_num_timesteps", None)
        if isinstance(total, int) and total > 0:
            state.num_steps = total
        if state.step_index < state.num_steps:  # after the last step, go straight on to decoding
            self.events.put(("progress", state, None))
            state.resume.wait()
            state.resume.clear()
            if state.aborted:
                raise _Aborted()
        return {}


def steps_after_strength(num_inference_steps: int, strength: float) -> int:
    """The steps diffusers' img2img `get_timesteps` keeps (same float arithmetic, same rounding)."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return num_inference_steps - int(max(num_inference_steps - init_timestep, 0))


def _default(pipe_cls: type, name: str) -> Any:
    """The default of one of the pipeline's __call__ arguments."""
    return inspect.signature(pipe_cls.__call__).parameters[name].default


def _check_image_inputs(pipeline_class: str, parameters: frozenset[str], params, fields: dict[str, Any]) -> None:
    """Input images and strength only where the pipeline takes them; an image-to-image pipeline
    (it takes `strength`) needs its image, an inpainting one its mask; several images only where
    the pipeline combines them (elsewhere diffusers reads a list as a batch of prompts' images and
    fails deep inside the forward)."""
    for key in IMAGE_KEYS:
        if fields.get(key) is not None and key not in parameters:
            raise ValueError(f"prompt[{key!r}] is not an input of {pipeline_class} (its __call__ takes no {key})")
        given = fields.get(key)
        if isinstance(given, list) and len(given) > 1 and pipeline_class not in MULTI_IMAGE_PIPELINES:
            raise ValueError(f"prompt[{key!r}] is a list of {len(given)} images; {pipeline_class} takes one")
    if params.strength is not None and "strength" not in parameters:
        raise ValueError(f"SamplingParams.strength is not an input of {pipeline_class}")
    if "strength" in parameters and fields.get("image") is None:
        raise ValueError(f"prompt['image'] is required: {pipeline_class} starts from an input image")
    if "mask_image" in parameters and fields.get("mask_image") is None:
        raise ValueError(f"prompt['mask_image'] is required: {pipeline_class} repaints where the mask is white")


def _check_frames(info: Any, params: Any) -> int | None:
    """A video request's frame count, checked against what the model's video VAE takes (None for
    an image pipeline)."""
    frames = info.frames_for(params)
    if frames is None:
        return None
    temporal = temporal_factor(read_vae_config(info.path))
    if (frames - 1) % temporal:
        raise ValueError(
            f"SamplingParams.num_frames must be {temporal}k + 1 (1, {temporal + 1}, {2 * temporal + 1}, ...) for "
            f"{info.pipeline_class}, whose video VAE compresses time {temporal}x; got {frames}"
        )
    if params.num_images_per_prompt != 1:
        raise ValueError(
            f"SamplingParams.num_images_per_prompt must be 1 for {info.pipeline_class} (one video per request; "
            f"submit several requests with their own seeds), got {params.num_images_per_prompt}"
        )
    return frames


@functools.lru_cache(maxsize=64)
def _call_parameters(pipe_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(pipe_cls.__call__).parameters)
