"""``python -m pyrovae``: the ``pyrovae`` command (see :mod:`pyrovae.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
