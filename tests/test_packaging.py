"""Every subpackage ships: pyproject's explicit package list covers all of kvsurgery/ and passes/."""

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
