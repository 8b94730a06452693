"""Builds the one C extension (the fast delimited-file parser); everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds, and the reader falls back to
its pure-pyarrow path (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "unified_embedding.data._fastcsv",
            sources=["src/unified_embedding/data/_fastcsv.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
