"""Environments behind one functional interface (see :mod:`jaxrl_suite.envs.core`).

``make("gymnax/CartPole-v1")``, ``make("brax/hopper")``, ``make("dmc/CartpoleBalance")``:
the prefix picks the back end; keyword arguments go to it (``max_episode_steps`` for all;
``backend=`` the brax physics pipeline; ``impl=``/``action_repeat=``/``config_overrides=`` for
DMC). ``list_envs()`` gives the known names per back end. Observation normalisation for
agents lives in :mod:`jaxrl_suite.envs.normalization`.
"""

from __future__ import annotations

import difflib

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats

__all__ = ["Env", "EnvSpec", "EnvState", "EpisodeStats", "make", "list_envs", "BACKENDS"]

BACKENDS = ("gymnax", "brax", "dmc")


def _names(backend: str) -> list[str]:
    if backend == "gymnax":
        import gymnax

        return list(gymnax.registered_envs)
    if backend == "brax":
        from jaxrl_suite.envs.brax_backend import brax_env_names

        return brax_env_names()
    if backend == "dmc":
        from jaxrl_suite.envs.dmc_backend import dmc_env_names

        return dmc_env_names()
    raise ValueError(f"unknown environment back end {backend!r}; known: {', '.join(BACKENDS)}")


def list_envs(backend: str | None = None) -> dict[str, list[str]]:
    """``{backend: [full names "backend/task", ...]}`` for one back end or all of them."""
    backends = BACKENDS if backend is None else (backend,)
    return {b: [f"{b}/{n}" for n in _names(b)] for b in backends}


def _unknown(name: str, candidates: list[str], what: str) -> ValueError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {what} {name!r}{hint}")


def make(name: str, **kwargs) -> Env:
    """Build an environment from ``"<backend>/<task>"``; raises ValueError on an unknown name.

    The error lists close matches (``difflib``) among all known names, e.g. ``brax/hoper`` ->
    ``'brax/hopper'``.
    """
    backend, sep, task = name.partition("/")
    if backend not in BACKENDS:
        # a bare task name ("hopper") or a misspelt back end: search every back end's names
        candidates = [n for names in list_envs().values() for n in names]
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        close += [n for n in candidates if n.partition("/")[2] == name and n not in close]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown environment {name!r}{hint} Names look like "
                         f"'<backend>/<task>' with backend one of {', '.join(BACKENDS)}")
    if not sep or not task:
        raise ValueError(f"environment name {name!r} must look like '<backend>/<task>'")
    names = _names(backend)
    if task not in names:
        full = [f"{backend}/{n}" for n in names]
        raise _unknown(name, full, f"{backend} environment")
    if backend == "gymnax":
        from jaxrl_suite.envs.gymnax_backend import make_gymnax
        return make_gymnax(task, **kwargs)
    if backend == "brax":
        from jaxrl_suite.envs.brax_backend import make_brax
        return make_brax(task, **kwargs)
    from jaxrl_suite.envs.dmc_backend import make_dmc
    return make_dmc(task, **kwargs)
