"""Train the `digits-qwen-image` weights on scikit-learn's handwritten digits.

    python -m pipelines.presets.digits_training --out pipelines/presets/digits

Two stages, deterministic from `--seed` on one CPU thread:

1. The VAE (`AutoencoderKLQwenImage`, 4 latent channels, 32x32 -> 4x4) learns to reconstruct the
   digits (L1 + MSE, a small KL term). Its per-channel latent mean and std over the dataset become
   the config's `latents_mean`/`latents_std`, which the pipeline undoes before decoding.
2. The transformer (`QwenImageTransformer2DModel`) learns flow matching on exactly what
   `QwenImagePipeline` feeds it: normalised latents packed 2x2 into 4 tokens, x_t = (1 - s) x0 + s n,
   the timestep s (the pipeline passes t / 1000 = sigma), target n - x0 (the velocity the Euler
   flow scheduler integrates), and sigmas drawn through the scheduler's own resolution shift, so
   training sees the noise levels inference visits. Prompts are the text encoder's embeddings of
   several phrasings naming the digit; 15% of the time the prompt is an empty one, so true CFG
   with an empty negative prompt works. The weights saved are an EMA of the trained ones.

The tokenizer and text encoder are the seeded tiny ones, frozen. The committed weights are this
command's output with its defaults (500 VAE steps of 32 images, 2,500 transformer steps of 64):
1,114 s (18.6 minutes, 6.4 of them the VAE) on one thread of the 2-core development machine,
shared with other work at the time; `training.json` beside the weights records that and the
accuracy the digit classifier gave the result. CI and the tests never run this.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.presets.common import seeded
from pipelines.presets.digits import (
    INFO_FILE,
    TRANSFORMER_FILE,
    VAE_FILE,
    digits_qwen_image,
    digits_transformer,
    digits_vae,
)
from pipelines.presets.digits_data import SIDE, UNCONDITIONAL, load_digits_8x8, prompts_for, to_pixels

DROP_TEXT = 0.15


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, pixels: torch.Tensor, *, steps: int, batch: int, lr: float, log) -> list[float]:
    """Reconstruction training; `pixels` (N, 3, H, W) in [-1, 1]."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=50)
        x = pixels[torch.randint(len(pixels), (batch,))][:, :, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} loss {np.mean(losses[-50:]):.4f} kl {kl.item():.3f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Posterior means (N, C, h, w) of `pixels`."""
    out = [
        vae.encode(pixels[i : i + chunk][:, :, None]).latent_dist.mean[:, :, 0] for i in range(0, len(pixels), chunk)
    ]
    return torch.cat(out)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): the 2x2 patch packing of QwenImagePipeline._pack_latents."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


@torch.no_grad()
def prompt_table(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (P, L, D) and masks (P, L) of `prompts`, each encoded alone (as the pipeline does
    for one prompt), zero-padded to a common length under the mask."""
    embeds = [pipe.encode_prompt(p, device=torch.device("cpu"))[0][0] for p in prompts]
    length = max(e.shape[0] for e in embeds)
    table = torch.zeros(len(prompts), length, embeds[0].shape[1])
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        table[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return table, mask


def train_transformer(
    model,
    x0: torch.Tensor,
    labels: torch.Tensor,
    table,
    mask,
    prompt_ids,
    uncond_ids,
    scheduler,
    *,
    steps,
    batch,
    lr,
    log,
):
    """Flow matching on packed normalised latents `x0` (N, T, 4C); returns (EMA model, losses)."""
    tokens = x0.shape[1]
    side = int(round(tokens**0.5))
    mu = _shift_mu(scheduler, tokens)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    img_shapes = [[(1, side, side)]] * batch
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=200)
        idx = torch.randint(len(x0), (batch,))
        digits = labels[idx]
        choice = prompt_ids[digits, torch.randint(prompt_ids.shape[1], (batch,))]
        drop = torch.rand(batch) < DROP_TEXT
        choice = torch.where(drop, uncond_ids[torch.randint(len(uncond_ids), (batch,))], choice)
        sigma = scheduler.time_shift(mu, 1.0, torch.rand(batch).clamp(1e-4, 1 - 1e-4))
        noise = torch.randn_like(x0[idx])
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0[idx] + s * noise
        pred = model(
            hidden_states=xt,
            timestep=sigma,
            encoder_hidden_states=table[choice],
            encoder_hidden_states_mask=mask[choice],
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        loss = (pred - (noise - x0[idx])).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step} loss {np.mean(losses[-100:]):.4f}")
    return ema, losses


def _shift_mu(scheduler, tokens: int) -> float:
    """The resolution shift QwenImagePipeline computes for `tokens` image tokens."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = scheduler.config
    return calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # float16 halves the files; the loader widens back to float32.
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}, str(path))


@torch.no_grad()
def evaluate(out: Path, seeds: int, log) -> dict:
    """Draw every digit with `seeds` seeds through diffusers' QwenImagePipeline on the saved weights
    and score them with the digit classifier, without and with true CFG."""
    from pipelines.presets.digit_classifier import DigitClassifier
    from pipelines.presets.digits_data import prompt_for

    pipe = digits_qwen_image(out)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier()
    prompts = [prompt_for(d) for d in range(10) for _ in range(seeds)]
    truth = np.array([d for d in range(10) for _ in range(seeds)])
    result = {}
    for name, extra in (
        ("no_cfg", {"true_cfg_scale": 1.0}),
        ("cfg4", {"negative_prompt": [""] * len(prompts), "true_cfg_scale": 4.0}),
    ):
        gens = [torch.Generator().manual_seed(s) for _ in range(10) for s in range(seeds)]
        images = pipe(
            prompt=prompts, generator=gens, height=SIDE, width=SIDE, num_inference_steps=20, output_type="np", **extra
        ).images
        result[name] = float((classifier.predict(images) == truth).mean())
        log(f"eval {name}: accuracy {result[name]:.3f}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the weights and training.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--transformer-steps", type=int, default=2500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-seeds", type=int, default=5)
    args = parser.parse_args(argv)

    from diffusers import QwenImagePipeline

    from pipelines.presets.qwen_image import qwen_scheduler, qwen_text_parts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    images, labels_np = load_digits_8x8()
    pixels = to_pixels(images)
    labels = torch.from_numpy(labels_np)

    vae = seeded(args.seed + 1, digits_vae).train()
    vae_losses = train_vae(vae, pixels, steps=args.vae_steps, batch=args.vae_batch, lr=2e-3, log=log)
    vae_seconds = time.perf_counter() - start
    latents = encode_latents(vae, pixels)
    # Rounded as training.json stores them, so training normalises exactly as the pipeline will.
    mean = latents.mean(dim=(0, 2, 3)).double().mul(1e6).round().div(1e6).float()
    std = latents.std(dim=(0, 2, 3)).double().mul(1e6).round().div(1e6).float()
    with torch.no_grad():
        recon = vae.decode(latents[:256, :, None]).sample[:, :, 0]
    log(
        f"vae recon L1 {(recon - pixels[:256]).abs().mean().item():.4f}; latent mean {mean.tolist()} std {std.tolist()}"
    )
    final_vae = digits_vae(mean.tolist(), std.tolist())
    final_vae.load_state_dict(vae.state_dict())
    _save(final_vae, out / VAE_FILE)

    tokenizer, text_encoder = qwen_text_parts()
    scheduler = qwen_scheduler()
    text_pipe = QwenImagePipeline(
        scheduler=scheduler, vae=final_vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None
    )
    per_digit = [prompts_for(d) for d in range(10)]
    all_prompts = [p for ps in per_digit for p in ps] + list(UNCONDITIONAL)
    table, mask = prompt_table(text_pipe, all_prompts)
    k = len(per_digit[0])
    prompt_ids = torch.arange(10 * k).view(10, k)
    uncond_ids = torch.arange(10 * k, len(all_prompts))

    x0 = pack((latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    model = seeded(args.seed + 2, digits_transformer)
    ema, tr_losses = train_transformer(
        model,
        x0,
        labels,
        table,
        mask,
        prompt_ids,
        uncond_ids,
        scheduler,
        steps=args.transformer_steps,
        batch=args.batch,
        lr=1e-3,
        log=log,
    )
    _save(ema, out / TRANSFORMER_FILE)
    seconds = time.perf_counter() - start
    info = {
        "latents_mean": mean.tolist(),
        "latents_std": std.tolist(),
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_batch": args.vae_batch,
        "transformer_steps": args.transformer_steps,
        "batch": args.batch,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "vae_seconds": round(vae_seconds, 1),
        "final_vae_loss": round(float(np.mean(vae_losses[-50:])), 5),
        "final_transformer_loss": round(float(np.mean(tr_losses[-100:])), 5),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved to {out} after {seconds:.0f} s")
    if args.eval_seeds:
        info["eval_accuracy_20_steps"] = evaluate(out, args.eval_seeds, log)
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
