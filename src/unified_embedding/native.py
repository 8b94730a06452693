"""The optional C extension `_kernels` (hashing, the fused optimizer step, dropout masks), loaded in one place.

`KERNELS` is None where the install had no C compiler (setup.py builds it with
`optional=True`); every caller then takes its torch path, which gives the same results.
"""

try:
    from unified_embedding import _kernels as KERNELS
except ImportError:
    KERNELS = None
