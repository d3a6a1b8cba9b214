# `python -m mgt_scale.cli ARGS` == `mgt ARGS`: the spelling scripts, tests and sbatch lines use; the
# dispatcher itself is mgt_scale/commands/main.py.
import sys

from mgt_scale.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
