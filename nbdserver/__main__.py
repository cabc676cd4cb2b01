"""``python -m nbdserver``: same as the ``qcow2-nbd`` command."""

import sys

from .cli import main

sys.exit(main())
