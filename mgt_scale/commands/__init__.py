# The command-line tools of `mgt`: the dispatcher (main.py) and the commands that are only a command
# (ckpt, export, generate, probe, eval). Library code a command uses lives in the package of its concern
# (train/, monitor/, hf/, ...); no module outside this package imports from it (tests/unit/test_layout.py).
# `mgt train`, `prep`, `report`, `slurm` and `experiment` keep their `main` beside the code they drive.
