"""The README's two commands stay true: CI runs exactly the test command it gives, and the run
command starts the mesh with the built-in model."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = ROOT.joinpath("README.md").read_text()
    ci_command = ROOT.joinpath(".ci", "run").read_text().strip().splitlines()[-1]
    assert ci_command in bash_blocks(readme)
    assert ci_command.endswith("-m pytest")


def test_readme_run_command_starts_the_mesh() -> None:
    blocks = bash_blocks(ROOT.joinpath("README.md").read_text())
    assert any(b.startswith("python3 -m venv .venv") and b.endswith("meshserve up") for b in blocks)


def test_readme_links_stay_inside_the_repository() -> None:
    """Every relative link names a file or folder of this repository (a clone has nothing
    beside it)."""
    links = re.findall(r"\]\(([^)\s]+)\)", ROOT.joinpath("README.md").read_text())
    local = [link.split("#")[0] for link in links if "://" not in link and link.split("#")[0]]
    assert local, "the README links nothing of its own"
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT), f"{link} points outside the repository"
        assert target.exists(), f"{link} does not exist"
