"""Everything about the build is in pyproject.toml except the package list, found here.

services/ is the package `meshserve` (DESIGN §2: package-dir maps it), and setuptools' `find`
directive cannot rename a folder: it would find `cli`, `router` … as top-level packages. A list
written by hand drifted once (the wheel lost `meshserve.cli`, so the image's console script could
not start), so every package under services/ is found at build time, and
tests/integration/test_wheel.py checks the built wheel against the tree.
"""

from setuptools import find_packages, setup

setup(packages=["meshserve", *(f"meshserve.{p}" for p in find_packages("services"))])
