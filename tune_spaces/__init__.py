"""Ray Tune parameter spaces of the three sweeps (``moco tune probe|momentum|mechanism``).

One module per sweep: :mod:`tune_spaces.probe_grid` (the linear layer's lr x weight decay),
:mod:`tune_spaces.momentum` (the key encoder's momentum m) and :mod:`tune_spaces.mechanism`
(end-to-end, memory bank and MoCo across the dictionary size K). Each is a grid: a list of
*points*, every point a dict of dotted config keys (``optim.lr``, ``momentum.base``, ...) and
their values, one trial per point. ``param_space(points)`` makes the Tune ``param_space``
(``{"trial": tune.grid_search(points)}``); the drivers in :mod:`pipelines.tune` turn each point
into ``--set`` overrides of the base recipe, so a sweep varies data, not code.

A space is a built-in name or a YAML file (:func:`tune_spaces.common.load_space`)::

    sweep: probe                 # the command it is for
    grid:                        # every combination is one trial
      optim.lr: [0.1, 1, 10]
      optim.weight_decay: [0, 1.0e-4]
    points:                      # optional: more trials, given one by one
      - {optim.lr: 30, optim.weight_decay: 0}
"""
