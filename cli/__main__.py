"""``python -m cli`` runs agentctl, as the ``agentctl`` command does."""

import sys

from cli.main import main

sys.exit(main())
