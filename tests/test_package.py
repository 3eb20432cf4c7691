"""The wheel a user installs holds every module and recipe of the source tree, and works outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    # a copy of what the package is built from: setuptools builds in place, and a build/ folder left in the
    # repository would hand the wheel files that the configuration no longer names
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out)]
    proc = subprocess.run([*cmd, str(tree)], capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("masksub-*.whl")
    return path


def test_the_wheel_holds_every_module_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {
        p.relative_to(SRC).as_posix()
        for p in (SRC / "masksub").rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert source - names == set(), "left out of the wheel"
    assert any(n.startswith("masksub/recipes/") and n.endswith(".yaml") for n in names)
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "masksub = masksub.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    """Installed without the source tree: the package imports from the install, finds its bundled recipes, and
    ``masksub recipes`` lists them."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = (
        "import masksub, masksub.train.config as c; print(masksub.__file__); "
        "print(c.load_config('fashion_mnist_vit').model.name); "
        "from masksub.cli import main; raise SystemExit(main(['recipes']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # -I would drop the venv's site-packages with the install's; -P keeps the working folder off sys.path
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(target), lines[0]  # not the editable install of the source tree
    assert lines[1] == "vit_tiny_patch16_224"  # the bundled recipe, read from the install
    assert "fashion_mnist_vit" in proc.stdout
