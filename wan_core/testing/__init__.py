"""Tiny random checkpoints in the real layouts, for tests and the demo (no real weights needed)."""
from wan_core.testing.dit import (DIT_LAYOUTS, dit_state_dict, layout_state_dict, tiny_dit_config,  # noqa: F401
                                  write_dit_checkpoint, write_streamed_dit)
from wan_core.testing.text import TEXT_LAYOUTS, tiny_text_config, write_text_encoder_checkpoint  # noqa: F401
from wan_core.testing.vae import VAE_LAYOUTS, tiny_vae_config, vae_state_dict, write_vae_checkpoint  # noqa: F401
from wan_core.testing.chat import make_chat_tokenizer, write_chat_model  # noqa: F401
