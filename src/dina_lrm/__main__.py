"""``python -m dina_lrm`` is the ``dina-lrm`` command (handy under ``accelerate launch -m dina_lrm``)."""

import sys

from dina_lrm.cli import main

sys.exit(main())
