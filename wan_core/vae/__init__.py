"""The Wan2.1 and Wan2.2 video VAEs (see model.py), tiling (tiling.py) and loading."""
from wan_core.vae.config import VAE_CONFIGS, WAN21_VAE, WAN22_VAE, VAEConfig  # noqa: F401
from wan_core.vae.loading import detect_vae_config, load_vae  # noqa: F401
from wan_core.vae.model import WanVAE  # noqa: F401
from wan_core.vae.tiling import Tiling  # noqa: F401
