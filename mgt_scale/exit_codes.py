# The exit-code contract between the trainer and whatever runs it (sbatch templates, mgt experiment):
# it decides whether a job is requeued, stopped for good, or retried a bounded number of times.
FINISHED = 0  # max_steps reached: do not requeue
CONFIG_ERROR = 2  # bad config / bad input: do not requeue (retrying cannot help)
PREEMPTED = 85  # SIGTERM/SIGUSR1/kill-switch/wall-time budget: checkpoint written, requeue and resume
COLLAPSE = 86  # a collapse alarm with policy checkpoint_and_stop: checkpoint written, do NOT requeue
NONFINITE = 87  # too many non-finite steps with nonfinite_policy=stop: do NOT requeue
NO_SPACE = 88  # a write failed for want of disk space or quota: do NOT requeue (retrying cannot help until
#                an operator frees space); status.json and the last stderr line name the path and free space
CRASH = 1  # an unexpected exception (status.json "failed" with its cause)
# anything else (1, signals, 137 from SIGKILL, ...) is a crash: retried a bounded number of times

REQUEUE = frozenset({PREEMPTED})
NO_REQUEUE = frozenset({FINISHED, CONFIG_ERROR, COLLAPSE, NONFINITE, NO_SPACE})
