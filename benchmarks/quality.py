"""Image quality of digits-qwen-image: how often the digit drawn is the digit the prompt names.

Every digit is generated with several seeds through the engine (all requests of a run co-batched
in one engine), and each image is read by a digit classifier fitted at run time on scikit-learn's
real 8x8 digits (`pipelines/presets/digit_classifier.py`, about 99% on held-out real digits).
Reported: accuracy per digit and overall at the default settings, accuracy against
`num_inference_steps` (no CFG) and against the true-CFG scale (empty negative prompt, default
steps), and the confusion matrix at the defaults. Writes JSON and a plot.

Usage: python benchmarks/quality.py [--seeds 10] [--steps 2 4 8 12 20 30] [--cfg-scales 1.5 2 3 4 6]
       [--json docs/digits_quality.json] [--plot docs/digits_quality.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402

DEFAULT_STEPS = 20  # SamplingParams' default


def _settings(args) -> list[dict]:
    """One entry per (steps, cfg) setting measured; cfg None = no CFG (the default)."""
    settings = [{"steps": s, "cfg": None} for s in args.steps]
    settings += [{"steps": DEFAULT_STEPS, "cfg": c} for c in args.cfg_scales]
    if not any(s["steps"] == DEFAULT_STEPS and s["cfg"] is None for s in settings):
        settings.append({"steps": DEFAULT_STEPS, "cfg": None})
    return settings


def measure(args) -> dict:
    from engine import Omni, SamplingParams
    from pipelines.presets.digit_classifier import DigitClassifier
    from pipelines.presets.digits_data import prompt_for

    t0 = time.perf_counter()
    classifier = DigitClassifier()
    fit_s = time.perf_counter() - t0
    settings = _settings(args)
    prompts, params, keys = [], [], []
    for k, setting in enumerate(settings):
        for digit in range(10):
            for seed in range(args.seeds):
                cfg = setting["cfg"]
                prompts.append({"prompt": prompt_for(digit), "negative_prompt": "" if cfg else None})
                params.append(
                    SamplingParams(
                        num_inference_steps=setting["steps"], true_cfg_scale=cfg, seed=seed, output_type="np"
                    )
                )
                keys.append((k, digit))
    t0 = time.perf_counter()
    with Omni(model=args.model, max_num_seqs=args.max_num_seqs, executor=args.executor) as omni:
        outputs = omni.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    errors = [o.error for o in outputs if o.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    predicted = classifier.predict(np.concatenate([o.images for o in outputs]))
    truth = np.array([digit for _, digit in keys])
    which = np.array([k for k, _ in keys])

    rows = []
    for k, setting in enumerate(settings):
        sel = which == k
        per_digit = [float((predicted[sel & (truth == d)] == d).mean()) for d in range(10)]
        rows.append({**setting, "accuracy": float((predicted[sel] == truth[sel]).mean()), "per_digit": per_digit})
    default = next(r for r in rows if r["steps"] == DEFAULT_STEPS and r["cfg"] is None)
    sel = which == rows.index(default)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (truth[sel], predicted[sel]), 1)
    return {
        "default": {"steps": DEFAULT_STEPS, "cfg": None, "accuracy": default["accuracy"]},
        "per_digit_default": default["per_digit"],
        "confusion_default": confusion.tolist(),
        "vs_steps": [{"steps": r["steps"], "accuracy": r["accuracy"]} for r in rows if r["cfg"] is None],
        "vs_cfg": [{"cfg": r["cfg"], "accuracy": r["accuracy"]} for r in rows if r["steps"] == DEFAULT_STEPS],
        "settings": rows,
        "requests": len(prompts),
        "classifier_fit_s": fit_s,
        "generate_s": generate_s,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-qwen-image")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per digit and setting")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 12, 20, 30])
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0, 6.0])
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--executor", choices=["inproc", "mp"], default="inproc")
    parser.add_argument("--json", default="benchmarks/results/digits_quality.json")
    parser.add_argument("--plot", default="benchmarks/results/digits_quality.png")
    args = parser.parse_args(argv)
    r = measure(args)
    print(
        f"{args.model}: {r['requests']} requests in {r['generate_s']:.1f} s; "
        f"classifier fitted in {r['classifier_fit_s']:.2f} s"
    )
    print(f"accuracy at the defaults ({DEFAULT_STEPS} steps, no CFG): {r['default']['accuracy']:.3f}")
    print("per digit: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(r["per_digit_default"])))
    print("vs steps (no CFG): " + ", ".join(f"{x['steps']}: {x['accuracy']:.3f}" for x in r["vs_steps"]))
    print(
        f"vs CFG scale ({DEFAULT_STEPS} steps): "
        + ", ".join(f"{x['cfg'] or 'none'}: {x['accuracy']:.3f}" for x in r["vs_cfg"])
    )
    report = {"results": r, "config": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        _plot(r, args, args.plot)
    return report


def _plot(r: dict, args, path: str) -> None:
    """Per-digit accuracy at the defaults, accuracy against steps, and against CFG scale."""
    plt = headless_pyplot(path)
    if plt is None:
        return
    fig, (digits, steps, cfg) = plt.subplots(1, 3, figsize=(12, 3.5))
    digits.bar(range(10), r["per_digit_default"], color="C0")
    digits.set_xticks(range(10))
    digits.set_xlabel("digit named by the prompt")
    digits.set_title(f"defaults ({DEFAULT_STEPS} steps, no CFG): {r['default']['accuracy']:.1%}")
    steps.plot([x["steps"] for x in r["vs_steps"]], [x["accuracy"] for x in r["vs_steps"]], "o-", color="C1")
    steps.set_xscale("log", base=2)
    steps.set_xticks([x["steps"] for x in r["vs_steps"]], [str(x["steps"]) for x in r["vs_steps"]])
    steps.set_xlabel("num_inference_steps (no CFG)")
    steps.set_title("against steps")
    xs = [x["cfg"] or 1.0 for x in r["vs_cfg"]]
    order = np.argsort(xs)
    cfg.plot(np.array(xs)[order], np.array([x["accuracy"] for x in r["vs_cfg"]])[order], "o-", color="C2")
    cfg.set_xlabel("true_cfg_scale (1 = no CFG)")
    cfg.set_title(f'against CFG scale ({DEFAULT_STEPS} steps, negative "")')
    for ax in (digits, steps, cfg):
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("classified as the named digit")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.model}: {args.seeds} seeds per digit and setting, scored by an SVM fitted on the real digits")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
