"""The ``mmalign`` command line: one module per subcommand, assembled by :mod:`.main`.

Every subcommand module (``train``, ``eval``, ``zeroshot``, ``export``, ``search``, ``prep``,
``demo``) has ``HELP`` (its one-line summary), ``add_arguments(parser)`` and
``run(args) -> int``. Building the parser imports nothing heavy: each ``run`` imports the
library modules it needs.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["search", "emb", "--text", "a handwritten seven", "--k", "3"])  # doctest: +SKIP
    0
"""
