"""Wan's text encoder: umt5-xxl (transformers' UMT5EncoderModel), its tokenizer and the
reference's prompt cleaning. `load_text_encoder(...).encode(prompts)` gives one
[tokens, 4096] embedding per prompt."""
from wan_core.text.clean import clean_prompt
from wan_core.text.encoder import WanTextEncoder, detect_umt5_config, load_text_encoder, umt5_config
from wan_core.text.tokenizer import UMT5Tokenizer, load_tokenizer

__all__ = ["WanTextEncoder", "UMT5Tokenizer", "clean_prompt", "detect_umt5_config", "load_text_encoder",
           "load_tokenizer", "umt5_config"]
