"""Speech-to-video (S2V-14B): the wav2vec2 loader and one node that turns the whole audio into a
talking video, clip by clip, the way the reference does (wan_core.pipeline.s2v).

The node returns IMAGE frames and the AUDIO cut to them, for core Create Video (with audio) and
Save Video. ComfyUI's own S2V nodes need one Extend node per clip, carry latents instead of
re-encoded frames between clips and feed the audio without the reference's prefix; this node
runs the reference's recipe for every clip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from wan_core import pipeline
from wan_core.audio import load_audio_encoder
from wan_core.sampling import SOLVERS

from . import host
from .loaders import DTYPES, WanModel, WanVAE, _check_choice
from .samplers import MAX_SEED, MAX_SIZE, _check_image, _check_type, _check_vae_fits, _video_to_images

AUDIO_DEVICES = ("cpu", "default")
MAX_CLIPS = 1000


@dataclass(eq=False)
class WanAudioEncoder:
    """A loaded wav2vec2 (WANAUDIOENCODER)."""

    hosted: host.HostedModel
    name: str

    @property
    def model(self):
        return self.hosted.model


class W22AudioEncoderLoader:
    DESCRIPTION = ("Loads the wav2vec2 audio encoder S2V-14B listens with (wav2vec2-large-xlsr-53-english) from "
                   "models/audio_encoders: ComfyUI's wav2vec2_large_english file, or any wav2vec2 safetensors.")
    CATEGORY = "Wan2.2/loaders"
    RETURN_TYPES = ("WANAUDIOENCODER",)
    RETURN_NAMES = ("audio_encoder",)
    OUTPUT_TOOLTIPS = ("The loaded audio encoder, for Wan2.2 Speech to Video.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio_encoder_name": (host.list_models("audio_encoders"), {
                "tooltip": "The wav2vec2 file in models/audio_encoders, e.g. wav2vec2_large_english_fp16.safetensors."}),
            "weight_dtype": (list(DTYPES), {
                "default": "fp32",
                "tooltip": "Precision of the encoder; the reference runs it in fp32 (fp16 files are upcast)."}),
            "device": (list(AUDIO_DEVICES), {
                "default": "cpu",
                "tooltip": "Where it runs: 'cpu' as the reference (it encodes the audio once per video); "
                           "'default' is ComfyUI's text-encoder device."}),
        }}

    def load(self, audio_encoder_name: str, weight_dtype: str, device: str):
        _check_choice("weight_dtype", weight_dtype, DTYPES)
        _check_choice("device", device, AUDIO_DEVICES)
        path = host.model_path("audio_encoders", audio_encoder_name)
        run_on = torch.device("cpu") if device == "cpu" else None

        def load() -> WanAudioEncoder:
            encoder = load_audio_encoder(path, dtype=DTYPES[weight_dtype], device=host.offload_device("text"))
            return WanAudioEncoder(host.HostedModel(encoder, "text", device=run_on), audio_encoder_name)

        return (host.model_cache.get_or_load(("audio", str(path), weight_dtype, device), load),)


class W22SpeechToVideo:
    DESCRIPTION = ("Wan2.2 S2V-14B: a talking video from speech and a reference image (and optionally a pose "
                   "video), the whole audio in one node. The video is generated clip by clip as the reference "
                   "does: each clip continues from the last 73 frames of the one before. Its frames are "
                   "frames_per_clip x clips - 3 (the first clip drops 3), at 16 fps; the size follows the "
                   "reference image at the area of width x height, in multiples of 64.")
    CATEGORY = "Wan2.2/sampling"
    RETURN_TYPES = ("IMAGE", "AUDIO")
    RETURN_NAMES = ("images", "audio")
    OUTPUT_TOOLTIPS = ("The video frames [frames, height, width, 3] in 0..1, for Create Video at 16 fps.",
                       "The input audio cut to the video's length, for Create Video's audio input.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WANMODEL", {"tooltip": "The S2V-14B DiT (wan2.2_s2v_14B_*) from Wan2.2 Model Loader."}),
                "conditioning": ("WANCONDITIONING", {
                    "tooltip": "From Wan2.2 Text Encode. S2V was trained with its own negative prompt (the "
                               "example workflow carries it)."}),
                "vae": ("WANVAE", {"tooltip": "wan_2.1_vae from Wan2.2 VAE Loader."}),
                "audio_encoder": ("WANAUDIOENCODER", {"tooltip": "From Wan2.2 Audio Encoder Loader."}),
                "audio": ("AUDIO", {"tooltip": "The speech (Load Audio). Its length sets the number of clips."}),
                "ref_image": ("IMAGE", {"tooltip": "The person to animate (the first image of a batch is used)."}),
                "width": ("INT", {
                    "default": 1024, "min": 64, "max": MAX_SIZE, "step": 64,
                    "tooltip": "Only the area width x height counts: the video keeps the reference image's "
                               "aspect, its sides rounded up to multiples of 64 (1024x704 as the reference's "
                               "README; 1280x720 is its default)."}),
                "height": ("INT", {"default": 704, "min": 64, "max": MAX_SIZE, "step": 64,
                                   "tooltip": "See width: only the area counts."}),
                "num_clips": ("INT", {
                    "default": 0, "min": 0, "max": MAX_CLIPS,
                    "tooltip": "0 = as many clips as the whole audio needs (the last one usually runs past it); "
                               "N = at most N clips."}),
                "frames_per_clip": ("INT", {
                    "default": 80, "min": 4, "max": 400, "step": 4,
                    "tooltip": "Frames per clip, a multiple of 4 (the reference's infer_frames: 80, or 48)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 1000, "tooltip": "Sampling steps per clip (40)."}),
                "cfg": ("FLOAT", {
                    "default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1,
                    "tooltip": "Guidance scale (reference 4.5); the unconditional pass uses the negative prompt "
                               "and silent audio features. At 1 or less only the conditional pass runs."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.1,
                                    "tooltip": "Noise schedule shift (reference 3)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Clip r draws its noise with seed + r, as the reference."}),
                "solver": (list(SOLVERS), {"default": "unipc", "tooltip": "unipc is the reference's default."}),
                "init_first_frame": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Start the video from the reference image itself (the reference's "
                               "--start_from_ref): no 3-frame drop, frames_per_clip x clips frames."}),
                "correct_audio_lead": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "The reference's video runs 3 frames (0.19 s) ahead of its sound. On: the "
                               "returned audio starts 3 frames in, so lips and sound line up."}),
            },
            "optional": {
                "pose_video": ("IMAGE", {
                    "tooltip": "Pose frames (e.g. DWPose renders) at 16 fps that drive the body; resized and "
                               "center-cropped to the video, black after they end."}),
                "memory": ("WANMEMORY", {
                    "tooltip": "From Wan2.2 Memory Settings: with offload on, the DiT waits in CPU memory "
                               "while the VAE decodes and re-encodes between clips."}),
            },
        }

    def run(self, model: WanModel, conditioning: dict, vae: WanVAE, audio_encoder: WanAudioEncoder, audio: dict,
            ref_image: torch.Tensor, width: int, height: int, num_clips: int, frames_per_clip: int, steps: int,
            cfg: float, shift: float, seed: int, solver: str, init_first_frame: bool, correct_audio_lead: bool,
            pose_video: Optional[torch.Tensor] = None, memory: Optional[dict] = None):
        _check_type("model", model, WanModel, "Wan2.2 Model Loader")
        if model.config.model_type != "s2v":
            raise ValueError(f"model is a {model.task.name} model; Wan2.2 Speech to Video needs the S2V-14B DiT "
                             f"(wan2.2_s2v_14B_*)")
        _check_type("vae", vae, WanVAE, "Wan2.2 VAE Loader")
        _check_vae_fits(vae, model.task)
        _check_type("audio_encoder", audio_encoder, WanAudioEncoder, "Wan2.2 Audio Encoder Loader")
        if not isinstance(conditioning, dict) or "context" not in conditioning:
            raise TypeError("conditioning must come from Wan2.2 Text Encode")
        if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
            raise TypeError("audio must be an AUDIO (e.g. from Load Audio)")
        _check_image("ref_image", ref_image)
        if pose_video is not None:
            _check_image("pose_video", pose_video)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {seed}")
        task = model.task
        clips = None if num_clips == 0 else num_clips
        pipeline.validate_s2v_request(task, size=(width, height), image=ref_image, audio=audio,
                                      frames_per_clip=frames_per_clip, num_clips=clips, steps=steps, shift=shift,
                                      guide_scale=cfg, solver=solver, allow_any_size=True)
        offload = bool((memory or {}).get("offload_inactive_expert", False))

        def place_dit(running: bool) -> None:
            if running:
                host.load_to_compute([model.hosted, vae.hosted])
            elif offload:
                host.offload([model.hosted])

        host.load_to_compute([audio_encoder.hosted, vae.hosted])
        device = model.hosted.device
        video = pipeline.s2v_clips(
            task, model.module, vae.vae, [conditioning["context"].to(device)],
            [conditioning["context_null"].to(device)], image=ref_image[0], audio=audio,
            audio_encoder=audio_encoder.model, pose_video=pose_video, num_clips=clips, frames_per_clip=frames_per_clip,
            init_first_frame=init_first_frame, area=width * height, steps=steps, shift=shift, guide_scale=cfg,
            solver=solver, seed=seed, callback=host.progress_callback(), interrupt=None, device=device,
            place_dit=place_dit)
        sound = pipeline.audio_for_video(audio["waveform"], audio["sample_rate"], video.shape[1], task.sample_fps,
                                         correct_lead=correct_audio_lead)
        return (_video_to_images(video[None]), {"waveform": sound, "sample_rate": audio["sample_rate"]})


NODE_CLASS_MAPPINGS = {
    "W22AudioEncoderLoader": W22AudioEncoderLoader,
    "W22SpeechToVideo": W22SpeechToVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "W22AudioEncoderLoader": "Wan2.2 Audio Encoder Loader",
    "W22SpeechToVideo": "Wan2.2 Speech to Video",
}
