"""A handwritten-digit classifier fitted at run time, to score what `digits-qwen-image` draws.

Numeric equality with diffusers cannot tell a good image from a bad one; this can: an RBF SVM
fitted on scikit-learn's 1,797 8x8 digits (a fraction of a second) reads each generated image,
area-averaged back to 8x8, and says which digit it shows. It scores about 99% on held-out real
digits, so a generated digit it misreads is almost always a badly drawn one.
"""

from __future__ import annotations

import numpy as np

from pipelines.presets.digits_data import load_digits_8x8, to_8x8


class DigitClassifier:
    def __init__(self):
        from sklearn.svm import SVC

        images, labels = load_digits_8x8()
        self._svc = SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), 64), labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Digits shown by `images` (N, H, W, 3) in [0, 1], dark ink on light paper."""
        return self._svc.predict(to_8x8(images))
