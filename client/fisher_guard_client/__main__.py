"""`python -m fisher_guard_client ...`: the same as `fisher-guard-gate ...`."""

import sys

from fisher_guard_client.gate import main

sys.exit(main())
