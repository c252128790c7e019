"""jaxrl_suite: deep-RL building blocks in JAX/Flax NNX (see ../shared/DESIGN.md).

Modules so far:

* :mod:`jaxrl_suite.envs`: one functional environment interface (auto-reset, termination kept
  apart from truncation, episode statistics) over gymnax, brax and MuJoCo Playground's DMC;
  observation normalisation.
* :mod:`jaxrl_suite.agents`: PPO, DQN, PQN, SAC and TD3, each fully jitted, chunked for
  logging/checkpointing and vmappable over seeds; a JAX replay buffer.
* :mod:`jaxrl_suite.networks`: MLP, residual (BRO-style) and multi-skip residual networks with
  optional LayerNorm, one frozen ``NetworkConfig`` and ``make_network``; forward passes can
  return per-layer activations, and ``neuron_layers()`` maps every group of neurons to its
  incoming and outgoing parameters in the params pytree.
* :mod:`jaxrl_suite.health`: neuron-health diagnostics: tau-dormant (ReDo) and GraMa scores,
  inactive fractions, per-layer gradient/weight norms, effective rank (srank), and a jittable
  ``health_report`` for logging.
* :mod:`jaxrl_suite.resets`: ReDo and ReGraMa neuron resets as pure, jittable functions on
  ``(params, opt_state)``, with threshold / bottom-fraction / capped selection.
"""
