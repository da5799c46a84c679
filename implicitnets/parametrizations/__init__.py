"""Parametrizations and projections that make maps contractions."""

from .spectral import SpectralBound, project_spectral_, spectral_norm

__all__ = ["SpectralBound", "spectral_norm", "project_spectral_"]
