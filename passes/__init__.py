"""kvsurgery's graph passes, one module per pass. Installed as `kvsurgery.passes` (see pyproject.toml)."""
