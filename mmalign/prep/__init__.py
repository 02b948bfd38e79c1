"""Data preparation tools: your own data into WebDataset shards, a text tokenizer, and shards
rewritten from a finished export. ``mmalign prep TOOL ...`` runs each (:mod:`mmalign.cli.prep`):

- :mod:`mmalign.prep.from_manifest` (``mmalign prep from-manifest``): a CSV/TSV/JSONL
  manifest of files and inline values to shards;
- :mod:`mmalign.prep.train_tokenizer` (``mmalign prep train-tokenizer``): a SentencePiece
  model from the text of shards or of a manifest;
- :mod:`mmalign.prep.group_shards` (``mmalign prep group-shards``): an export's records
  ordered by k-means cluster (neighbour batches);
- :mod:`mmalign.prep.mine_negatives` (``mmalign prep mine-negatives``): an export's records
  with hard negatives copied in;
- :mod:`mmalign.prep.reshard`: what those two share (an export's rows, its source records,
  the writing of the new shards).

The demo's own shards come from :mod:`mmalign.demo.data` (``mmalign prep make-demo``).

Example:
    >>> from mmalign.prep.from_manifest import convert
    >>> convert("pairs.csv", "shards", {"image": "png", "caption": "txt"})["records"]
    ... # doctest: +SKIP
    5
"""
