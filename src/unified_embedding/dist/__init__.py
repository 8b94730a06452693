"""TorchRec integration: the unified table as a sharded EmbeddingBagCollection (the optional `torchrec` extra).

- `modules`: a slot-table embedding as a TorchRec module (hashing before the lookup, one
  EmbeddingBagConfig listing every (feature, probe) key), and state-dict converters.
- `sharding`: the network under DistributedModelParallel, the table sharded row-wise with fused kernels.
- `train`: `ue train` on N processes (torch.distributed.run), sharded checkpoints, resume.
- `plan`: `ue plan`, TorchRec's sharding plan and per-rank memory for a table of any size.

Importing this package needs nothing beyond the base install; its modules need torchrec.
"""

from __future__ import annotations

INSTALL_HINT = (
    "TorchRec is not installed; install the extra, then torchrec itself without its CUDA fbgemm-gpu: "
    "pip install 'unified-embedding[torchrec]' && pip install --no-deps torchrec==1.8.0"
)


def require_torchrec() -> None:
    """Raise ImportError with the install steps when torchrec (or fbgemm-gpu) cannot be imported."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
