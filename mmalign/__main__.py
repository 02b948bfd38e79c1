"""``python -m mmalign ...`` and ``accelerate launch -m mmalign train CONFIG``."""

from mmalign.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
