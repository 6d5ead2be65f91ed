"""``python -m unconfuse.cli``: the ``unconfuse`` command."""
import sys

from unconfuse.cli import main

sys.exit(main())
