# The script every rank runs: under `deepspeed` (hostfile, --num_gpus, --num_nodes), under `srun`
# (one task per GPU) or `torchrun`. Same arguments as `mgt train`. Signal handlers go in first, before
# torch and DeepSpeed are imported, so a pre-timeout signal during start-up is not lost.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgt_scale.train.preemption import install_signal_handlers  # noqa: E402

install_signal_handlers()

from mgt_scale.exit_codes import CONFIG_ERROR  # noqa: E402
from mgt_scale.logs import setup_logging  # noqa: E402

try:
    setup_logging()  # rank and world from the launcher's environment (RANK / SLURM_PROCID, ...)
except ValueError as e:  # MGT_LOG_LEVEL names no level
    print(f"error: {e}", file=sys.stderr)
    sys.exit(CONFIG_ERROR)

from mgt_scale.train.entry import exit_rank, main  # noqa: E402

if __name__ == "__main__":
    exit_rank(main())  # os._exit after flushing: no interpreter teardown, where ranks have aborted (-6)
