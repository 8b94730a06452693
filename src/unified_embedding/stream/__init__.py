"""Streaming training and progressive validation over time-ordered data (`ue stream`)."""

from unified_embedding.stream.runner import Stream, StreamConfig, StreamRunner, Window, dataset_stream

__all__ = ["Stream", "StreamConfig", "StreamRunner", "Window", "dataset_stream"]
