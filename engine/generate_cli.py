"""`stepweave generate`: one prompt's images (or video) written to files with their settings.

A bad request fails before any worker starts (the engine's own submission checks, run from the
model's configs), so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _generate(args: argparse.Namespace) -> int:
    from engine.cli import EXIT_FAILED, EXIT_OK, engine_config
    from engine.cli_checks import check_before_start, check_output_kind, output_paths

    config = engine_config(args)
    params, prompt = _request(args)
    paths = output_paths(args.output, args.num_images)
    info = check_before_start(config, prompt, params)  # a bad request fails before any worker starts
    check_output_kind(args.output, info)
    if not 1 <= args.fps <= 240:
        raise ValueError(f"--fps must be an integer in [1, 240], got {args.fps}")

    from engine import Omni

    with Omni(config) as omni:
        (output,) = omni.generate([prompt], params, use_tqdm=sys.stderr.isatty())
    if output.error is not None:
        print(f"error: {output.error}", file=sys.stderr)
        return EXIT_FAILED
    seeds = f"seed {output.seed}" if len(paths) == 1 else f"seeds {output.seed}..{output.seed + len(paths) - 1}"
    what = ""
    if output.frames is not None:
        from engine.video_file import write_video

        write_video(paths[0], output.frames, fps=args.fps)
        what = f"{len(output.frames)} frames at {args.fps} fps, "
    else:
        for path, image in zip(paths, output.images):
            image.save(path)
    print(f"wrote {', '.join(paths)} ({what}{output.num_steps} steps, {seeds}, {output.metrics.latency_s:.2f} s)")
    return EXIT_OK


def _request(args: argparse.Namespace) -> tuple[Any, dict]:
    from engine.cli_inputs import parse_pipeline_args, read_images
    from engine.contract.sampling_params import SamplingParams

    params = SamplingParams(
        num_inference_steps=args.steps,
        true_cfg_scale=args.cfg_scale,
        guidance_scale=args.cfg_scale,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        seed=args.seed,
        scheduler=args.scheduler,
        num_images_per_prompt=args.num_images,
        strength=args.strength,
        pipeline_args=parse_pipeline_args(args.pipeline_arg),
        deadline_s=args.deadline_s,
    )
    prompt: dict = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    if args.class_label is not None:
        prompt = {"class_label": args.class_label}
    for key, flag, paths in (("image", "--image", args.image), ("mask_image", "--mask", args.mask)):
        if paths:
            prompt[key] = read_images(flag, paths)
    return params, prompt


def add_generate_parser(commands) -> None:
    from engine.cli import EXIT_CODES, _HelpFormatter, add_engine_args

    gen = commands.add_parser(
        "generate",
        help="generate images (or a video) for one prompt",
        description="Generate images for one prompt and write them as PNG files with their settings; with a "
        "text-to-video model (Wan), a video written as .mp4 or .gif, chosen by --output's extension.",
        formatter_class=_HelpFormatter,
        epilog=EXIT_CODES,
    )
    gen.add_argument("--prompt", default="a handwritten digit seven", help="what to draw")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from; Qwen-Image's true CFG needs one")
    gen.add_argument("--class-label", type=int, default=None, help="ImageNet class label, for DiT models (no prompt)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (SamplingParams.num_inference_steps)")
    gen.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="guidance scale; sets both true_cfg_scale (Qwen-Image, with --negative-prompt) and guidance_scale "
        "(DiT, SD3, FLUX's distilled guidance), whichever the model uses (default: the model's own, "
        "4.0 for Qwen-Image and DiT)",
    )
    gen.add_argument("--seed", type=int, default=0, help="the noise seed; image i of --num-images uses seed + i")
    gen.add_argument("--num-images", type=int, default=1, help="images for the prompt (num_images_per_prompt)")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--scheduler", default=None, help="a diffusers scheduler class name (default: the model's)")
    gen.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an input image file (image-to-image, editing); repeat for pipelines that take several",
    )
    gen.add_argument("--mask", action="append", metavar="PATH", help="a mask image file (inpainting: white repaints)")
    gen.add_argument(
        "--strength", type=float, default=None, help="image-to-image: how much of --image is noised away, in (0, 1]"
    )
    gen.add_argument(
        "--pipeline-arg",
        action="append",
        metavar="NAME=VALUE",
        help="a further __call__ argument of an adapter-served pipeline (SamplingParams.pipeline_args; "
        "VALUE as JSON), e.g. max_area=4096",
    )
    gen.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames of a video (video models; Wan: 4k + 1) (default: the model's)",
    )
    gen.add_argument("--fps", type=int, default=16, help="frames per second of a written video")
    gen.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="seconds by which the image should be done; with --scheduling-policy deadline, a deadline it "
        "cannot meet is refused before it runs (SamplingParams.deadline_s)",
    )
    gen.add_argument(
        "--output",
        default="out.png",
        help="the image file; with --num-images N, NAME-0.png .. NAME-(N-1).png; a video model writes .mp4 or .gif",
    )
    # The one preset with trained weights: its images show what the prompt names.
    add_engine_args(gen, default_model="digits-qwen-image")
    gen.set_defaults(func=_generate)
