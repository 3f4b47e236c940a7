"""Matplotlib for the benchmarks' plots: headless, and optional (it comes with the bench extra)."""

from __future__ import annotations

import sys


def headless_pyplot(path: str):
    """matplotlib.pyplot drawing to files, or None (saying that `path` is not written) when
    matplotlib is not installed: a benchmark's JSON matters more than its picture."""
    try:
        import matplotlib
    except ImportError:
        print(
            f"plot skipped: matplotlib is not installed (pip install -e '.[bench]'); {path} not written",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
