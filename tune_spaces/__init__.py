"""Ray Tune parameter spaces (momentum sweep, mechanism x K sweep, linear-probe grid).

Each space is a plain function returning a Tune ``param_space`` and reuses the pipelines' train
functions; none is implemented yet (see the roadmap in README.md).
"""
