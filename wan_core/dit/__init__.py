"""The Wan diffusion transformer (one class; variants are `DiTConfig`s)."""
from wan_core.dit.model import WanDiT

__all__ = ["WanDiT"]
