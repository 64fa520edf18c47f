"""``python -m gpt2`` is the ``gpt2`` command."""

import sys

from gpt2.cli import main

sys.exit(main())
