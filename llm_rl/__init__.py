"""llm_rl: see ../shared/DESIGN.md (methods land here)."""
