"""Tiny random checkpoints in the real layouts, for tests and the demo (no real weights needed)."""
from wan_core.testing.dit import (DIT_LAYOUTS, S2V_LAYOUTS, dit_state_dict, layout_state_dict,  # noqa: F401
                                  tiny_dit_config, write_dit_checkpoint, write_streamed_dit)
from wan_core.testing.text import TEXT_LAYOUTS, tiny_text_config, write_text_encoder_checkpoint  # noqa: F401
from wan_core.testing.vae import VAE_LAYOUTS, tiny_vae_config, vae_state_dict, write_vae_checkpoint  # noqa: F401
from wan_core.testing.chat import make_chat_tokenizer, write_chat_model  # noqa: F401
from wan_core.testing.audio import AUDIO_LAYOUTS, tiny_ctc_model, tiny_wav2vec2_config, write_audio_encoder_checkpoint  # noqa: F401
from wan_core.testing.compare import PLACEMENT_TOLERANCE, max_relative_error  # noqa: F401
