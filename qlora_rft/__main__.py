"""`python -m qlora_rft ...` is `qlora-rft ...` (and what `accelerate launch -m qlora_rft` runs)."""

import sys

from qlora_rft.cli import main

sys.exit(main())
