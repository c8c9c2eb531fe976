"""A non-editable install (a wheel, as ``pip install .`` or a cluster image makes) is complete.

The wheel is built from a copy of the source tree (so no build/ or egg-info lands in the
checkout), installed with ``pip install --target``, and imported in a subprocess whose only
project code is that install: it runs outside the repository, and the test checks where every
module and recipe came from.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Not part of any distribution; everything else that holds an __init__.py is a package.
_NOT_PACKAGED = {"tests", "build", "dist"}
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "outputs", "mlruns", "tests"
)

_LOAD_EVERY_RECIPE = """
import json, sys
import moco_recipes, pipelines
from pipelines.evaluate.probe_config import PROBE_RECIPES_DIR, load_probe_config, probe_recipe_path
from pipelines.pretrain.config import RECIPES_DIR, load_config, recipe_path
names = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))
probe_names = sorted(path.stem for path in PROBE_RECIPES_DIR.glob("*.yaml"))
for name in names:
    load_config(name)
for name in probe_names:
    load_probe_config(name)
print(json.dumps({
    "names": names,
    "probe_names": probe_names,
    "recipes_dir": str(RECIPES_DIR),
    "recipe_paths": [str(recipe_path(name)) for name in names] + [str(probe_recipe_path(n)) for n in probe_names],
    "modules": [moco_recipes.__file__, pipelines.__file__, sys.modules["moco_core"].__file__],
}))
"""


def _source_packages() -> set[str]:
    """Dotted names of the package directories in the checkout (recipes/ is installed as moco_recipes)."""
    packages = set()
    for init in REPO.rglob("__init__.py"):
        parts = init.relative_to(REPO).parent.parts
        if parts and parts[0] not in _NOT_PACKAGED and not parts[0].startswith("."):
            packages.add(".".join(parts))
    packages.discard("recipes")
    return packages | {"moco_recipes"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "moco-ray"
    shutil.copytree(REPO, source, ignore=_COPY_IGNORE)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (built,) = wheels.glob("moco_ray-*.whl")
    return built


def test_the_wheel_holds_every_package_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {name[: -len("/__init__.py")].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packaged == _source_packages()
    recipes = {name.removeprefix("moco_recipes/") for name in names if name.startswith("moco_recipes/")}
    recipe_files = {str(path.relative_to(REPO / "recipes")) for path in (REPO / "recipes").rglob("*.yaml")}
    assert {name for name in recipes if name.endswith(".yaml")} == recipe_files


def test_every_built_in_recipe_loads_from_a_non_editable_install(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_EVERY_RECIPE],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["names"] == sorted(path.stem for path in (REPO / "recipes").glob("*.yaml"))
    assert loaded["probe_names"] == sorted(path.stem for path in (REPO / "recipes" / "probe").glob("*.yaml"))
    # Everything came from the install, nothing from the checkout (an editable install's finder included).
    for path in [loaded["recipes_dir"], *loaded["recipe_paths"], *loaded["modules"]]:
        assert Path(path).resolve().is_relative_to(target.resolve()), path
