"""``python -m agent`` runs the agent, as the ``mtls-agent`` command does."""

import sys

from agent.server import main

sys.exit(main())
