"""``python -m threadweaver_verl COMMAND [args]``: see :mod:`threadweaver_verl.cli`."""

import sys

from threadweaver_verl.cli import main

if __name__ == "__main__":
    sys.exit(main())
