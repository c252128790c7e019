"""jaxrl_suite: see ../shared/DESIGN.md (methods land here)."""
