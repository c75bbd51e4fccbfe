"""``python -m adamkit`` runs the ``adamkit`` command."""
import sys

from adamkit.cli import main

sys.exit(main())
