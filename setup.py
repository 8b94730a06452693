"""Builds the two small C extensions; everything else is in pyproject.toml.

- `unified_embedding.data._fastcsv`: the fast parser of plain delimited files (data/fastpath.py);
- `unified_embedding._kernels`: hashing, the fused optimizer step and dropout masks, one pass each
  (hashing.py, fused.py, models/dropout.py).

`optional=True`: without a C compiler the install still succeeds, and each caller falls back to
its pure pyarrow / torch path (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "unified_embedding.data._fastcsv",
            sources=["src/unified_embedding/data/_fastcsv.c"],
            depends=["src/unified_embedding/splitmix64.h"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "unified_embedding._kernels",
            sources=["src/unified_embedding/_kernels.c"],
            depends=["src/unified_embedding/splitmix64.h"],
            # no fused multiply-adds (aarch64 contracts by default): each operation rounds as torch's do
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        ),
    ]
)
