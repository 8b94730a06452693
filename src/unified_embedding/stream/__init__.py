"""Streaming training and progressive validation over time-ordered data (`ue stream`)."""

from unified_embedding.stream.runner import DEFAULT_BATCH_SIZE as DEFAULT_STREAM_BATCH_SIZE
from unified_embedding.stream.runner import Stream, StreamConfig, StreamRunner, Window, dataset_stream

__all__ = ["DEFAULT_STREAM_BATCH_SIZE", "Stream", "StreamConfig", "StreamRunner", "Window", "dataset_stream"]
