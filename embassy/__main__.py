"""``python -m embassy`` is the ``embassy`` command."""

import sys

from embassy.cli import main

sys.exit(main())
