"""``python -m gradleak.cli``: the ``gradleak`` command."""

import sys

from . import main

sys.exit(main())
