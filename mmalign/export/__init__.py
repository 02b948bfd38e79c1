"""Embedding export, FAISS index and search (split in the next commit)."""

from mmalign.export.writer import *  # noqa: F403
