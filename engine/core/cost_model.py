"""How long one step batch takes, as a function of what is in it.

The deadline policy has to predict finish times and weigh "run more rows" (every step gets
slower) against "run fewer" (the urgent ones finish sooner), so it needs the time of a step batch
from its composition. Here that time is linear in a few features of the batch:

    seconds = c0                                  per-batch overhead (dispatch, scheduler steps)
            + c1 * rows                           rows = CFG branches x images, summed
            + c2 * sum(rows * image_tokens) / 1e3 the transformer's token work
            + c3 * sum(rows * text_tokens) / 1e3
            + c4 * sum(rows * tokens**2) / 1e6    attention's quadratic part
            + c5 * requests starting              prompt encoding, noise, set_timesteps
            + c6 * sum(image_tokens finishing) / 1e3  VAE decode (one per request)
            + c7 * forwards                       one transformer forward per batch key (image size)
            + c8 * decodes                        one VAE call per batch key among those finishing

The runner splits a step batch into one forward per batch key (requests of different sizes cannot
share one), and joins the decodes of the requests of one key that finish together; each call has a
fixed cost (launching its modules), so a batch mixing two sizes costs more than the per-row terms
say, and decoding two requests together costs less than twice one.

The coefficients come from a JSON profile, a short profile of the loaded model at engine start,
or both, and are refitted online from every measured batch: a ridge fit over the most recent
`window` batches pulled towards the profile, so directions the recent batches do not vary in
(all requests the same size, say) keep the profile's value instead of drifting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

PRIOR_WEIGHT = 8.0  # a profile counts as this many measured batches in the online fit
OUTLIER_MADS = 6.0  # batches further off the fit than this many median deviations are left out

FEATURES = (
    "batch",
    "rows",
    "image_ktokens",
    "text_ktokens",
    "attention_mtokens2",
    "starting",
    "decode_ktokens",
    "forwards",
    "decodes",
)
START, DECODE, FORWARDS, DECODES = (FEATURES.index(f) for f in ("starting", "decode_ktokens", "forwards", "decodes"))


@dataclass(frozen=True)
class RequestShape:
    """What one request puts into each step batch it sits in."""

    rows: int = 1  # CFG branches x images: rows of every forward
    image_tokens: int = 0  # latent patches of one row
    text_tokens: int = 0  # prompt tokens of one row (an estimate)
    forward_key: tuple | None = None  # requests share a forward only with equal keys; None: by image_tokens

    @property
    def key(self):
        return self.image_tokens if self.forward_key is None else self.forward_key


def batch_features(running: Iterable[RequestShape], starting: int = 0, finishing: Iterable[RequestShape] = ()) -> list:
    """The feature vector of one step batch (see the module docstring)."""
    rows = image = text = attention = 0.0
    keys = set()
    for shape in running:
        tokens = shape.image_tokens + shape.text_tokens
        rows += shape.rows
        image += shape.rows * shape.image_tokens / 1e3
        text += shape.rows * shape.text_tokens / 1e3
        attention += shape.rows * tokens * tokens / 1e6
        keys.add(shape.key)
    decode, decode_keys = 0.0, set()
    for shape in finishing:
        decode += shape.image_tokens / 1e3
        decode_keys.add(shape.key)
    return [1.0, rows, image, text, attention, float(starting), decode, float(len(keys)), float(len(decode_keys))]


class CostModel:
    def __init__(self, coefficients: dict[str, float] | None = None, window: int = 256, refit_every: int = 8):
        self.prior = np.array([float((coefficients or {}).get(name, 0.0)) for name in FEATURES])
        self.coef = self.prior.copy()
        self._coef = self.coef.tolist()  # for fast dot products with short feature lists
        self.window = window
        self.refit_every = refit_every
        # the last `window` batches, as a ring buffer (refits read it without copying lists)
        self._xs = np.zeros((window, len(FEATURES)))
        self._ys = np.zeros(window)
        self._since_fit = 0
        self.observed = 0  # batches measured so far

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """A profile written by `save` (or by hand: {"coefficients": {feature: seconds}})."""
        try:
            data = json.loads(Path(path).read_text())
            coefficients = data["coefficients"]
            values = [float(v) for v in coefficients.values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"EngineConfig.cost_profile must be 'measure' or a JSON file with {{\"coefficients\": {{feature: "
                f"seconds}}}}; {path}: {exc}"
            ) from None
        if not all(v >= 0 and v < float("inf") for v in values):
            raise ValueError(f"cost profile {path}: coefficients must be finite and >= 0, got {coefficients}")
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"cost profile {path}: unknown feature(s) {sorted(unknown)}; known: {list(FEATURES)}")
        return cls(coefficients)

    def to_json(self, **extra) -> dict:
        return {"coefficients": dict(zip(FEATURES, map(float, self.coef))), **extra}

    def save(self, path: str | Path, **extra) -> None:
        Path(path).write_text(json.dumps(self.to_json(**extra), indent=2) + "\n")

    @property
    def known(self) -> bool:
        """Whether predictions mean anything yet (a profile, or measured batches)."""
        return self.observed > 0 or bool(self.prior.any())

    def predict(self, features: list) -> float:
        return max(0.0, sum(c * f for c, f in zip(self._coef, features)))

    def step_time(self, shapes: Iterable[RequestShape]) -> float:
        """Seconds of one denoising step of these requests together (no encode, no decode)."""
        return self.predict(batch_features(shapes))

    def run_alone_time(self, shape: RequestShape, steps: int) -> float:
        """Seconds a request needs when it has the workers to itself: its first step with the
        encode, its middle steps, its last with the decode."""
        return steps * self.step_time([shape]) + self._coef[START] + self.decode_time(shape)

    def decode_time(self, shape: RequestShape) -> float:
        """Seconds one request's decode adds to the batch it finishes in (decoded alone)."""
        return self._coef[DECODE] * shape.image_tokens / 1e3 + self._coef[DECODES]

    def observe(self, features: list, seconds: float) -> None:
        """One measured batch; refits every `refit_every` batches."""
        if not np.isfinite(seconds) or seconds < 0:
            return
        slot = self.observed % self.window
        self._xs[slot] = features
        self._ys[slot] = seconds
        self.observed += 1
        self._since_fit += 1
        # Without a profile the first batch is all there is to go by; with one, wait for a few
        # (one odd batch alone would pull the profile off).
        if self._since_fit >= self.refit_every or (self.observed == 1 and not self.prior.any()):
            self.refit()

    def refit(self) -> None:
        """Ridge least squares towards the prior (a profile weighs as much as `PRIOR_WEIGHT`
        batches, so a few odd batches cannot throw it off; without one, the fit is plain least
        squares), then once more without the batches it fits worst (outliers beyond
        OUTLIER_MADS median absolute deviations: a first batch that compiled, a stall). Negative
        coefficients are clipped: more work never makes a batch faster."""
        self._since_fit = 0
        held = min(self.observed, self.window)
        x, y = self._xs[:held], self._ys[:held]
        if not held:
            return
        coef = self._solve(x, y)
        residual = np.abs(x @ coef - y)
        mad = float(np.median(residual))
        keep = residual <= OUTLIER_MADS * mad + 1e-6 * float(np.median(y))
        if 0 < keep.sum() < held:
            coef = self._solve(x[keep], y[keep])
        self.coef = coef
        self._coef = self.coef.tolist()

    def _solve(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        has_prior = bool(self.prior.any())
        # With no profile, the prior is the mean batch time as pure overhead: a sane start.
        prior = self.prior if has_prior else np.array([float(y.mean())] + [0.0] * (len(FEATURES) - 1))
        weight = PRIOR_WEIGHT if has_prior else 1e-6 * len(y)
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)
        active = np.ones(len(FEATURES), dtype=bool)
        coef = prior.copy()
        for _ in range(2):
            xs = x[:, active] / scale[active]
            lam = weight * np.eye(int(active.sum()))
            target = prior[active] * scale[active]
            solution = np.linalg.solve(xs.T @ xs + lam, xs.T @ y + lam @ target)
            coef = np.zeros(len(FEATURES))
            coef[active] = solution / scale[active]
            if (coef >= 0).all():
                break
            active &= coef > 0
            active[0] = True
        return np.maximum(coef, 0.0)
