"""generative: see ../shared/DESIGN.md (methods land here).

* :mod:`generative.datasets`: rendered shapes and upscaled sklearn digits (32x32 RGB) as tfds
  array_record data sets read with grain (``build``, ``load``).
* :mod:`generative.sem`: Simplicial Embedding (``simplicial_embedding``, ``SEMHead``).
* :mod:`generative.dlc`: Discrete Latent Codes (``tokens``, ``compose``, ``sample_code``).
* :mod:`generative.discrete_diffusion`: MDLM masked diffusion (loss, SUBS, sampler).
* :mod:`generative.code_denoiser`: a small NNX transformer denoiser for codes and its train step.
"""
