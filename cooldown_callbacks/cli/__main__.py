"""``python -m cooldown_callbacks.cli``: the ``cooldown-callbacks`` command."""

import sys

from . import main

sys.exit(main())
