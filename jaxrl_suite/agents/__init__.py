"""Fully jitted deep-RL agents over :mod:`jaxrl_suite.envs`, PureJaxRL-style.

Each agent module has a frozen config with presets and ``make_agent(config, env)`` returning
pure functions ``init(key) -> state``, ``train_chunk(state, num_updates) -> (state, metrics)``
(the :func:`trainkit.loop.fit` chunk signature), ``train(key)`` (everything in one jit) and a
deterministic ``policy(params, obs)`` for :func:`evaluation.evaluate`; all vmap over seeds.

* :mod:`~jaxrl_suite.agents.ppo`: PPO, discrete (categorical) and continuous (Gaussian).
* :mod:`~jaxrl_suite.agents.dqn`: DQN with a JAX replay buffer, target network, double DQN.
* :mod:`~jaxrl_suite.agents.pqn`: PQN (Gallici et al. 2024): vectorised Q(lambda), no replay.
* :mod:`~jaxrl_suite.agents.evaluation`: evaluation episodes and rollout episode statistics.
* :mod:`~jaxrl_suite.agents.replay`: the uniform replay buffer (shared with SAC/TD3).
"""

AGENTS = ("ppo", "dqn", "pqn")

__all__ = ["AGENTS"]
