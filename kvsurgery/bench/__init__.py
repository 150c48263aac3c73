"""Benchmarks, side by side in one run: `decode` (the `kvsurgery bench` command: whole-model prefill and decode
against HF's caches), `attention` (the decode-attention kernels alone) and `kvpress_peer` (kvpress SnapKV, run by
the python of a separate venv)."""
