# `python -m mgt_scale.commands ARGS` == `mgt ARGS`.
import sys

from mgt_scale.commands.main import main

sys.exit(main())
