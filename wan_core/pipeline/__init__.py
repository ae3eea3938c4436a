"""Generation end to end, used by the CLI, the demo and the ComfyUI nodes.

- `request`: the task, its sizes and frame counts, and `Request`, the one layer of checks a
  request passes before anything heavy loads (used by the CLI, `generate` and the nodes);
- `images`: seeded noise, image loading and the I2V / TI2V image conditions;
- `video`: `generate` for t2v-A14B, i2v-A14B and ti2v-5B (and the dispatch to `s2v`);
- `s2v`: speech-to-video (S2V-14B), clip by clip, with its own request checks and preprocessing;
- `folders`: a task's models from the reference's official checkpoint folder.
"""
from wan_core.pipeline.folders import TOKENIZER_DIR, TaskModels, checkpoint_files, load_task_models
from wan_core.pipeline.images import (ImageInput, best_output_size, encode_image_condition, first_frame_mask,
                                      i2v_pixel_size, initial_noise, load_image, ti2v_image, ti2v_pixel_size)
from wan_core.pipeline.request import (MAX_SEED, Request, SamplingSettings, Size, Workload, check_device,
                                       check_frame_num, check_sampling, check_seed, check_size, default_size,
                                       estimate_workload,
                                       format_size, latent_frames, latent_shape, official_folder_name, parse_size,
                                       resolve_task, validate_request)
from wan_core.pipeline.video import Experts, GenerationInterrupted, StepCallback, encode_prompts, generate
from wan_core.pipeline.s2v import (audio_for_video, generate_s2v, pose_frame_indices, pose_pixels, reference_pixels,
                                   s2v_clips, s2v_size, validate_s2v_request)

__all__ = [
    "TOKENIZER_DIR", "TaskModels", "checkpoint_files", "load_task_models",
    "ImageInput", "best_output_size", "encode_image_condition", "first_frame_mask", "i2v_pixel_size",
    "initial_noise", "load_image", "ti2v_image", "ti2v_pixel_size",
    "MAX_SEED", "Request", "SamplingSettings", "Workload", "check_device", "check_frame_num", "check_sampling",
    "check_seed", "check_size", "estimate_workload",
    "Size", "default_size", "format_size", "latent_frames", "latent_shape", "official_folder_name",
    "parse_size", "resolve_task", "validate_request",
    "Experts", "GenerationInterrupted", "StepCallback", "encode_prompts", "generate",
    "audio_for_video", "generate_s2v", "pose_frame_indices", "pose_pixels", "reference_pixels", "s2v_clips", "s2v_size",
    "validate_s2v_request",
]
