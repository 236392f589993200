"""``python -m lorakit`` = the ``lorakit`` command."""

from lorakit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
