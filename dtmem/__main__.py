"""`python -m dtmem`: the same as the `dtmem` command."""

import sys

from dtmem.cli import main

sys.exit(main())
