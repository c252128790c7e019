"""Fully jitted deep-RL agents over :mod:`jaxrl_suite.envs`, PureJaxRL-style.

Each agent module has a frozen config with presets and ``make_agent(config, env)`` returning
pure functions ``init(key) -> state``, ``train_chunk(state, num_updates) -> (state, metrics)``
(the :func:`trainkit.loop.fit` chunk signature; SAC/TD3: ``train_chunk(state, num_steps=None)``
returning metrics averaged over the chunk), ``train(key)`` (everything in one jit) and a
deterministic ``policy(params, obs)`` for :func:`evaluation.evaluate`; all vmap over seeds.

* :mod:`~jaxrl_suite.agents.ppo`: PPO, discrete (categorical) and continuous (Gaussian).
* :mod:`~jaxrl_suite.agents.dqn`: DQN with a JAX replay buffer, target network, double DQN.
* :mod:`~jaxrl_suite.agents.pqn`: PQN (Gallici et al. 2024): vectorised Q(lambda), no replay.
* :mod:`~jaxrl_suite.agents.sac`: SAC (v2, automatic temperature, twin critics), critic health
  reports and ReDo/ReGraMa critic resets inside the jitted loop.
* :mod:`~jaxrl_suite.agents.td3`: TD3 (target smoothing, delayed actor), same hooks as SAC.
* :mod:`~jaxrl_suite.agents.evaluation`: evaluation episodes and rollout episode statistics.
* :mod:`~jaxrl_suite.agents.replay`: the uniform replay buffer (shared with SAC/TD3).
"""

AGENTS = ("ppo", "dqn", "pqn", "sac", "td3")

__all__ = ["AGENTS"]
