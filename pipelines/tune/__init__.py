"""Ray Tune sweeps: the linear-probe grid search, the momentum sweep and the mechanism x K sweep
(``moco tune probe|momentum|mechanism``); the spaces are in :mod:`tune_spaces`."""
