"""generative: see ../shared/DESIGN.md (methods land here).

* :mod:`generative.datasets`: rendered shapes and upscaled sklearn digits (32x32 RGB) as tfds
  array_record data sets read with grain (``build``, ``load``).
* :mod:`generative.sem`: Simplicial Embedding (``simplicial_embedding``, ``SEMHead``).
* :mod:`generative.dlc`: Discrete Latent Codes (``tokens``, ``compose``, ``sample_code``).
* :mod:`generative.discrete_diffusion`: MDLM masked diffusion (loss, SUBS, sampler).
* :mod:`generative.code_denoiser`: a small NNX transformer denoiser for codes and its train step.
* :mod:`generative.vit_dino`: the SEM encoder: a ViT with the SEM layer before a DINO head,
  trained by self-distillation (multi-crop, EMA teacher, centering); ``extract_codes``.
* :mod:`generative.dit`: a DiT (adaLN-Zero, pixel space) conditioned on codes, rectified-flow
  training, Euler sampling with classifier-free guidance.
* :mod:`generative.evaluation`: an attribute classifier for the rendered shapes, the Frechet
  distance in its features (not FID), precision/recall, attribute accuracy, sample grids.
"""
