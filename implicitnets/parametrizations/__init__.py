"""Parametrizations and projections that make maps contractions (spectral, operator,
circulant-extension and ∞-norm bounds) or monotone (``I − W ⪰ m I``, :func:`monotone_weight`)."""

from .circulant import CirculantConvBound, circulant_norm, conv_circulant_norm
from .conv import ConvOperatorBound, conv_operator_norm, conv_spectral_norm
from .infinity_norm import InfNormBound, inf_norm, project_inf_norm_, project_l1_ball
from .monotone import MonotoneWeight, monotone_weight
from .spectral import SpectralBound, project_spectral_, spectral_norm

__all__ = [
    "SpectralBound",
    "spectral_norm",
    "project_spectral_",
    "ConvOperatorBound",
    "conv_spectral_norm",
    "conv_operator_norm",
    "CirculantConvBound",
    "conv_circulant_norm",
    "circulant_norm",
    "InfNormBound",
    "inf_norm",
    "project_inf_norm_",
    "project_l1_ball",
    "MonotoneWeight",
    "monotone_weight",
]
