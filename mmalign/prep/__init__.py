"""Data preparation tools: your own data into WebDataset shards, and a text tokenizer.

Each module has a ``main(argv)`` that ``mmalign prep TOOL ...`` runs:

- :mod:`mmalign.prep.from_manifest` (``mmalign prep from-manifest``): a CSV/TSV/JSONL
  manifest of files and inline values to shards;
- :mod:`mmalign.prep.train_tokenizer` (``mmalign prep train-tokenizer``): a SentencePiece
  model from the text of shards or of a manifest.

The demo's own shards come from :mod:`mmalign.demo.data` (``mmalign prep make-demo``).

Example:
    >>> from mmalign.prep import from_manifest
    >>> from_manifest.main(["pairs.csv", "--out", "shards", "--fields", "image=png,caption=txt"])
    ... # doctest: +SKIP
    0
"""
