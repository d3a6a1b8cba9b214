# Experiment sweeps: YAML sweep files expanded into cells (sweep.py), run as `mgt train` subprocesses
# with geometry at init measured in-process (runner.py), evaluated on their final checkpoints
# (copy_eval.py) and collected into tables and figures (collect.py, figures.py).
