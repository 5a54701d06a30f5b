"""Generative reference models built on :mod:`lightning_mtl`: DDPM on diffusers and a GAU language model."""
