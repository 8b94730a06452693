"""Readers for public CTR datasets and users' own files, a columnar cache, splits and batches.

Data flows one way: files -> reader (checked, hashed chunks) -> columnar cache ->
`CTRData` (memory-mapped columns) -> `split_indices` / `vocabularies` -> `BatchLoader` ->
`Batch`. Readers know nothing of embeddings or models.
"""

from unified_embedding.data.config import load_config
from unified_embedding.data.dataset import CTRData
from unified_embedding.data.errors import BadInputError, ConfigError
from unified_embedding.data.load import load_dataset, resolve_cache_dir, resolve_data_dir
from unified_embedding.data.loader import BatchLoader
from unified_embedding.data.registry import DATASETS, DatasetInfo
from unified_embedding.data.split import Split, split_indices
from unified_embedding.data.vocab import ids_by_frequency, vocabularies

__all__ = [
    "DATASETS",
    "BadInputError",
    "BatchLoader",
    "CTRData",
    "ConfigError",
    "DatasetInfo",
    "Split",
    "ids_by_frequency",
    "load_config",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_dir",
    "split_indices",
    "vocabularies",
]
