"""Shared machinery for every method: config, run directory, metrics, checkpoints,
mesh/sharding, guards, plots and the chunked training loop. No domain code lives here."""

import flax as _flax

# Parameters carry logical-axis names as metadata only; trainkit.sharding maps them to the
# mesh when a run places them (eager sharding would require a mesh at model construction).
_flax.config.update("flax_always_shard_variable", False)

__all__ = ["config", "run", "checkpoint", "sharding", "guards", "plots", "loop"]
