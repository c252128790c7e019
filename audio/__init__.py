"""audio: see ../shared/DESIGN.md (methods land here)."""
