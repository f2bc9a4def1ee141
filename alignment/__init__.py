"""Reward fine-tuning of text-to-image diffusion policies (DDPO, Diffusion-DPO, DRaFT, scaling).

Import submodules explicitly (``from alignment.policy import DiffusionPolicy``); importing the
package itself loads nothing heavy.
"""
