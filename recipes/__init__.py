"""The built-in training recipes (``*.yaml``), installed as the ``moco_recipes`` package so that
``pipelines.pretrain.config.recipe_path`` finds them through ``importlib.resources`` wherever the
project is installed (pyproject.toml maps this directory to that name)."""
