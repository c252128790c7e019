"""Environments behind one functional interface (see :mod:`jaxrl_suite.envs.core`).

``make("gymnax/CartPole-v1")``, ``make("brax/hopper")``, ``make("dmc/CartpoleBalance")``:
the prefix picks the back end; keyword arguments go to it (``max_episode_steps``, ...).
"""

from __future__ import annotations

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats

__all__ = ["Env", "EnvSpec", "EnvState", "EpisodeStats", "make", "BACKENDS"]

BACKENDS = ("gymnax",)


def make(name: str, **kwargs) -> Env:
    """Build an environment from ``"<backend>/<task>"``; raises ValueError on an unknown name."""
    backend, sep, task = name.partition("/")
    if not sep or not task:
        raise ValueError(f"environment name {name!r} must look like '<backend>/<task>' with "
                         f"backend one of {', '.join(BACKENDS)}")
    if backend == "gymnax":
        from jaxrl_suite.envs.gymnax_backend import make_gymnax
        return make_gymnax(task, **kwargs)
    raise ValueError(f"unknown environment back end {backend!r} in {name!r}; known: "
                     f"{', '.join(BACKENDS)}")
