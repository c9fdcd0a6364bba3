"""The lock files: every dependency of pyproject.toml pinned, with hashes, within its range;
the dev lock agrees with the runtime lock; the image and the venv install from them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;]+)(?: ; .+)? \\$")


def pins(name: str) -> dict[str, str]:
    """``{package: version}`` of a pip-compile output; each pin must carry hashes."""
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines):
        if not line or line[0] in "# ":
            continue
        match = PIN.match(line)
        assert match, f"{name}:{number + 1}: not a hashed pin: {line!r}"
        assert lines[number + 1].strip().startswith("--hash=sha256:"), f"{name}:{number + 1}"
        found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def declared(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    texts = project["optional-dependencies"][extra] if extra else project["dependencies"]
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize(
    ("lock", "extras"), [("requirements.lock", ()), ("requirements-dev.lock", ("dev",))]
)
def test_every_declared_dependency_is_pinned_within_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    locked = pins(lock)
    for requirement in declared() + [r for extra in extras for r in declared(extra)]:
        version = locked.get(canonicalize_name(requirement.name))
        assert version is not None, f"{lock}: {requirement.name} is not locked (make lock)"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock}: {requirement.name}=={version} is outside {requirement} (make lock)"
        )


def test_the_dev_lock_has_the_runtime_pins() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_the_image_and_the_venv_install_from_the_locks() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --require-hashes -r requirements.lock" in dockerfile
    assert "pip install --no-deps ." in dockerfile
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--require-hashes -r requirements-dev.lock" in makefile
    assert re.search(r"^lock:", makefile, re.MULTILINE)
    assert re.search(r"^\t\$\(BIN\)/deptry \.$", makefile, re.MULTILINE), "make lint runs deptry"
