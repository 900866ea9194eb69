"""What we ship is what we test: the wheel that `pip install .` and deploy/Dockerfile build holds
every package of the tree, and its console script starts from the wheel alone — not from the
editable install the rest of the suite runs on (which hides a package missing from the build)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built as deploy/Dockerfile builds it: from a copy of what its wheel stage copies (so no
    build/ folder left by an earlier build — setuptools reuses build/lib — can fill a gap in the
    package list, and a file the build needs but the image lacks fails here)."""
    src = tmp_path_factory.mktemp("src")
    for names in docker_copies():
        *sources, _dest = names
        for name in sources:
            if (ROOT / name).is_dir():
                shutil.copytree(
                    ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: setuptools is a pinned dev dependency, and CI need not fetch it twice.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("meshserve-*.whl")
    return built


def docker_copies() -> list[list[str]]:
    """The COPY lines of the Dockerfile's wheel stage (before the second FROM)."""
    stage = (ROOT / "deploy" / "Dockerfile").read_text().split("\nFROM ")[1]
    copies = [line.split()[1:] for line in stage.splitlines() if line.startswith("COPY ")]
    assert copies, "the Dockerfile's first stage copies nothing"
    return copies


def test_the_image_installs_the_wheel_and_checks_its_console_script() -> None:
    final = (ROOT / "deploy" / "Dockerfile").read_text().split("\nFROM ")[2]
    assert "pip wheel" not in final and "COPY services" not in final  # no source tree in the image
    assert re.search(r"pip install [^\n]*meshserve-\*\.whl|\$whl", final)
    assert re.search(r"^RUN meshserve --help", final, flags=re.M)


def tree_modules() -> set[str]:
    """Every file the package needs, as its path inside the wheel (services/ → meshserve/)."""
    services = ROOT / "services"
    return {
        "meshserve/" + str(p.relative_to(services))
        for p in services.rglob("*")
        if p.suffix in (".py", ".pyi", ".typed") and "__pycache__" not in p.parts
    }


def test_the_wheel_holds_every_module_of_the_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("meshserve/")}
    missing = tree_modules() - shipped
    assert not missing, f"the wheel lacks {sorted(missing)[:10]}"
    assert "meshserve/cli/__init__.py" in shipped  # what the console script imports


def test_the_console_script_runs_from_the_wheel_alone(wheel: Path, tmp_path: Path) -> None:
    """pip installs the wheel (no -e, no dependencies) into a fresh venv; the dependencies are
    borrowed from this environment through a plain path line (a .pth path line adds a folder to
    sys.path but runs none of that folder's .pth files, so the editable install stays off)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path)}
    where = subprocess.run(
        [str(py), "-c", "import meshserve.cli; print(meshserve.cli.__file__)"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(site)), f"imported from {where}, not the wheel"
    script = env_dir / "bin" / "meshserve"  # the console script pip made from the wheel
    for args in (["--help"], ["up", "--help"], ["agent", "--help"], ["router", "--help"]):
        run = subprocess.run(
            [str(script), *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, (args, run.stdout[-2000:], run.stderr[-2000:])
        assert "Usage" in run.stdout, args
