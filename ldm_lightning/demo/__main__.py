"""`python -m ldm_lightning.demo`: the same as `ldm-lightning demo`."""

import sys

from .cli import main

sys.exit(main())
