"""`python -m fanout`: the same as the `fanout` console script."""

import sys

from fanout.cli import main

sys.exit(main())
