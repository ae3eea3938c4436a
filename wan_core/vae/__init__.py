"""The Wan2.1 and Wan2.2 video VAEs (model.py), spatial tiling (tiling.py) and loading."""
from wan_core.vae.config import VAE_CONFIGS, WAN21_VAE, WAN22_VAE, VAEConfig
from wan_core.vae.loading import detect_vae_config, load_vae
from wan_core.vae.model import WanVAE
from wan_core.vae.tiling import Tiling

__all__ = ["VAE_CONFIGS", "WAN21_VAE", "WAN22_VAE", "VAEConfig", "WanVAE", "Tiling", "detect_vae_config", "load_vae"]
