"""`python -m consort`: the command line."""

import sys

from consort.cli import main

sys.exit(main())
