"""Spot-level samples (Visium spots, Visium HD bins): landing, deconvolution, domains."""
