"""``python -m mmalign ...`` and ``accelerate launch -m mmalign train CONFIG``.

Example:
    $ python -m mmalign train run.yaml --set train.steps=20
"""

from mmalign.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
