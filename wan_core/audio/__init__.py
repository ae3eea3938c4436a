"""Audio for S2V-14B: loading and resampling (`load_audio`), the wav2vec2 encoder
(`load_audio_encoder`) and the DiT's audio input (`audio_features`); docs/s2v-facts.md §3."""
from wan_core.audio.encoder import load_audio_encoder, wav2vec2_config
from wan_core.audio.features import (FEATURE_RATE, MIN_SAMPLES, audio_features, clip_count, encode_waveform,
                                     feature_frames, frame_indices, wav2vec_frames)
from wan_core.audio.waveform import SAMPLE_RATE, load_audio, read_audio_file

__all__ = ["load_audio", "read_audio_file", "load_audio_encoder", "audio_features", "wav2vec2_config", "encode_waveform",
           "wav2vec_frames", "feature_frames", "clip_count", "frame_indices", "SAMPLE_RATE", "FEATURE_RATE",
           "MIN_SAMPLES"]
