"""``python -m demo``: run the story (see :mod:`demo.story`)."""

from demo.story import main

if __name__ == "__main__":
    raise SystemExit(main())
