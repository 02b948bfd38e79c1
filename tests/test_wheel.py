"""The installed package runs its own demo: wheel built, installed (not editable), run elsewhere.

The wheel is built from a copy of the source tree (so that no ``build/`` or stale files of the
checkout end up in it), installed with ``pip install --target`` into a temporary ``site``
folder, and ``mmalign demo --quick`` runs from an empty folder outside the checkout with only
that folder on ``PYTHONPATH``. Nothing is downloaded (``--no-index``, offline hubs).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

pytestmark = pytest.mark.launches

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "setup.cfg")
PERCENT = re.compile(r"^\d+(\.\d+)?%$")
OFFLINE = {
    "PIP_NO_INDEX": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{output}"
    return output


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    """Build the wheel from a copy of the sources and install it into ``<tmp>/site``."""
    try:
        setuptools = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        setuptools = Version("0")
    if setuptools < Version("77"):
        pytest.fail(
            f"building the wheel without isolation needs setuptools>=77 in {sys.prefix} "
            f"(found {setuptools}): run `make install` or pip install 'setuptools>=77'"
        )
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(
        ROOT / "mmalign",
        source / "mmalign",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    for name in SOURCE_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, **OFFLINE}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    wheels = tmp / "wheels"
    _run(
        [*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        source,
        env,
        300,
    )
    (wheel,) = wheels.glob("mmalign-*.whl")
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp, env, 300)
    work = tmp / "work"
    work.mkdir()
    return {
        "wheel": wheel,
        "site": site,
        "work": work,
        "env": {**env, "PYTHONPATH": str(site)},
    }


def test_wheel_ships_the_demo_configs(installed: dict) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    configs = {"demo_digits.yaml", "demo_digits_sum_symile.yaml", "demo_digits_sum_clip.yaml"}
    assert {f"mmalign/demo/configs/{name}" for name in configs} <= set(names)
    page = {"index.html", "page.js", "page.css"}  # the search page of mmalign serve
    assert {f"mmalign/serve/static/{name}" for name in page} <= set(names)
    assert not [name for name in names if name.startswith(("tests/", "configs/", "data_prep/"))]


def test_installed_copy_is_the_one_imported(installed: dict) -> None:
    site, work = installed["site"], installed["work"]
    # find_spec locates the module without running it (no torch import: fast).
    spec = "importlib.util.find_spec('mmalign.demo.pipeline')"
    code = f"import importlib.util; print('ORIGIN', {spec}.origin)"
    output = _run([sys.executable, "-c", code], work, installed["env"], 120)
    module = Path(re.search(r"^ORIGIN (.+)$", output, re.MULTILINE).group(1))
    assert module.is_relative_to(site) and not module.is_relative_to(ROOT), module
    assert (module.parent / "configs" / "demo_digits.yaml").is_file()


@pytest.mark.timeout(900)
def test_quick_demo_runs_from_the_installed_wheel(installed: dict) -> None:
    site, work = installed["site"], installed["work"]
    assert not list(work.iterdir()), "the demo must start from an empty folder"
    script = site / "bin" / "mmalign"
    assert script.is_file(), "the wheel's console script was not installed"
    output = _run([str(script), "demo", "--quick"], work, installed["env"], 840)

    report = work / "runs" / "demo" / "REPORT.md"
    assert report.is_file(), output
    assert (work / "data" / "demo" / "digits" / "summary.json").is_file()
    text = report.read_text()
    # The configs the demo read are the installed package's, not the checkout's.
    configs = re.search(r"the configs in `([^`]+)`", text)
    assert configs and Path(configs.group(1)).is_relative_to(site), text[:400]
    assert str(ROOT) not in text

    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ]
    targets = [row for row in rows if "(digits" in row[0]]
    assert len(targets) == 7, text  # digits 2, digits-motion 3, digits-sum 2
    for row in targets:
        assert PERCENT.match(row[1]) and 0.0 <= float(row[1][:-1]) <= 100.0, row
        assert row[3] in ("yes", "no"), row
    total = next(row for row in rows if row[0].startswith("**total"))
    assert float(total[1]) > 0.0 and float(total[2]) > 0.0, total
    assert re.search(r"precision@5 \d+\.\d%", text), text
