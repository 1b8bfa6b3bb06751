"""`python -m neurotap.apps.server [MODEL] [options]`: the same as `neurotap serve`."""
import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
