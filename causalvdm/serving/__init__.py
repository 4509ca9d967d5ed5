"""Serving: many streams on one model (`StreamEngine`, continuous batching over a pool of KV-cache rows)."""

from causalvdm.serving.engine import EngineFull, FinishedChunk, StreamEngine

__all__ = ["EngineFull", "FinishedChunk", "StreamEngine"]
