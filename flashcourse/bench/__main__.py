"""``python -m flashcourse.bench ...`` is ``flashcourse bench ...`` (for a checkout that is not installed)."""

import sys

from .cli import main

sys.exit(main())
