"""``python -m server`` starts the HTTP server (same as the ``steerserve`` command)."""

import sys

from server.cli import main

sys.exit(main())
