"""`python -m wan_core generate ...` / `python -m wan_core demo` (see wan_core.cli)."""
import sys

from wan_core.cli import main

sys.exit(main())
