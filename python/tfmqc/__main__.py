"""``python -m tfmqc ...``: the ``tfmqc`` command."""

import sys

from . import main

sys.exit(main())
