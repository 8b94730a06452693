"""What produced a result: the versions and the machine, recorded in every run.json and results row."""

from __future__ import annotations

import platform
import sys

import torch

import unified_embedding


def versions() -> dict[str, str]:
    """Package, torch and Python versions, and the platform with torch's CPU kernel level.

    The kernel level (AVX2, AVX512, ...) is there because torch picks its CPU kernels by it,
    and they round differently: the same seed of the same code gave MovieLens-100K `full` 1x
    test AUC 0.7881 on one of our machines and 0.7902 on another. A seed reproduces a run to
    the bit only where these fields match.
    """
    return {
        "unified_embedding": unified_embedding.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.platform()}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}",
    }
