"""``python -m spinn``: the same as the ``spinn`` console command."""

import sys

from spinn.cli import main

sys.exit(main())
