"""The end-to-end demo on handwritten digits: data, four trainings, evaluation, search, report.

``mmalign demo [--quick]`` (or :func:`mmalign.demo.pipeline.run_demo`) runs it from any
directory: everything it needs ships with the package. The modules, one concept each:

- :mod:`mmalign.demo.pipeline`: the orchestration, :func:`~mmalign.demo.pipeline.run_demo`
  and its steps (data, configs, training);
- :mod:`mmalign.demo.runs`: a trained demo model (:class:`~mmalign.demo.runs.Run`);
- :mod:`mmalign.demo.timings`: the wall and CPU seconds of each step;
- :mod:`mmalign.demo.results`: the measurements of the trained models;
- :mod:`mmalign.demo.report`: ``REPORT.md`` and its sections;
- :mod:`mmalign.demo.data`: the shard builder (``mmalign prep make-demo``);
- :mod:`mmalign.demo.digits`: the digit's image, caption, tone and seven-segment graph;
- ``configs/``: the four demo configs (:func:`mmalign.demo.pipeline.default_configs_dir`).

Example:
    >>> from mmalign.demo.pipeline import run_demo
    >>> run_demo("data/demo", "runs/demo", quick=True)  # doctest: +SKIP
    PosixPath('runs/demo/REPORT.md')
"""
