"""One module per method: its configs (presets) and its run entry. `python -m experiments`."""
