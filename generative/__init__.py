"""generative: see ../shared/DESIGN.md (methods land here)."""
