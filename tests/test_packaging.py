"""Every subpackage ships: pyproject's explicit package list covers all of kvsurgery/ and passes/, and its package data
every file there that is not Python (the C++ source a CPU kernel is built from)."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        "kvsurgery." + ".".join(init.parent.relative_to(ROOT / "kvsurgery").parts)
        for init in (ROOT / "kvsurgery").rglob("__init__.py")
        if init.parent != ROOT / "kvsurgery"
    }
    assert found | {"kvsurgery", "kvsurgery.passes"} <= listed, sorted(found - listed)
    assert config["package-dir"]["kvsurgery.passes"] == "passes"


def test_every_data_file_is_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in (ROOT / "kvsurgery").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            package = ".".join(("kvsurgery", *path.parent.relative_to(ROOT / "kvsurgery").parts))
            assert any(path.match(glob) for glob in data.get(package, [])), f"{path} is not in package-data"
