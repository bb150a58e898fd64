"""`python -m hf_otfusion.cli` (what `torchrun -m hf_otfusion.cli` runs): the `otfusion-hub` command."""

import sys

from . import main

sys.exit(main())
