"""``python -m stem_live.cli``: the same as the ``stem-live`` command."""

import sys

from stem_live.cli.app import main

sys.exit(main())
