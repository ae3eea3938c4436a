"""Loading a task's models from the reference's official checkpoint folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from wan_core.configs import TaskConfig
from wan_core.loading import INDEX_SUFFIX, SAFETENSORS_SUFFIXES
from wan_core.pipeline.request import official_folder_name, resolve_task
from wan_core.pipeline.video import _expert_list, generate

if TYPE_CHECKING:
    from wan_core.dit import WanDiT

TOKENIZER_DIR = Path("google") / "umt5-xxl"  # beside the .pth in every official folder


@dataclass
class TaskModels:
    """A task's loaded models and where they run; `generate(**request)` runs one request."""

    task: TaskConfig
    experts: Union["WanDiT", tuple["WanDiT", "WanDiT"]]
    vae: object
    text_encoder: object
    device: torch.device
    offload_model: bool = False
    t5_cpu: bool = False
    audio_encoder: object = None  # S2V's wav2vec2

    def compile_blocks(self) -> None:
        """torch.compile every expert's transformer blocks (`WanDiT.compile_blocks`)."""
        for expert in _expert_list(self.experts):
            expert.compile_blocks()

    def enable_block_swap(self, blocks_to_swap: Union[int, str], *, size: tuple[int, int], frame_num: int,
                          prefetch: int = 1) -> list[int]:
        """Swap blocks of every expert to `self.device` (`WanDiT.enable_block_swap`); "auto"
        plans each for a video of `size` (width, height) and `frame_num` frames, with what the
        device has free when it is planned. Returns the number swapped per expert."""
        from wan_core.pipeline.request import latent_shape

        shape = latent_shape(self.task, size, frame_num)
        return [expert.enable_block_swap(blocks_to_swap, device=self.device, prefetch=prefetch, latent_shape=shape,
                                         place=not self.offload_model)
                for expert in _expert_list(self.experts)]

    def generate(self, **request) -> torch.Tensor:
        if self.audio_encoder is not None:
            request.setdefault("audio_encoder", self.audio_encoder)
        return generate(self.task, experts=self.experts, vae=self.vae, text_encoder=self.text_encoder,
                        device=self.device, offload_model=self.offload_model, t5_cpu=self.t5_cpu, **request)


def _has_dit_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.lower().endswith((INDEX_SUFFIX,) + SAFETENSORS_SUFFIXES)
                                   for p in folder.iterdir())


def checkpoint_files(task: Union[str, TaskConfig], ckpt_dir: Union[str, os.PathLike]) -> dict[str, Path]:
    """The parts of an official checkpoint folder for `task`, by role, after checking they are
    there: "high_noise"/"low_noise" expert folders (A14B) or "dit" (the 5B's folder itself),
    "text_encoder" (.pth), "tokenizer" (google/umt5-xxl/), "vae" (.pth). A FileNotFoundError
    names every missing one."""
    task = resolve_task(task)
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root} (--ckpt_dir takes the official folder, "
                                f"e.g. {official_folder_name(task)})")
    if task.is_moe:
        dits = {"high_noise": root / task.high_noise_checkpoint, "low_noise": root / task.low_noise_checkpoint}
    else:
        dits = {"dit": root}
    files = {**dits, "text_encoder": root / task.t5_checkpoint, "tokenizer": root / TOKENIZER_DIR,
             "vae": root / task.vae_checkpoint}
    if "wav2vec" in task.extra:  # S2V's audio encoder, a transformers folder
        files["audio_encoder"] = root / task.extra["wav2vec"]
    missing = [f"{path.name}/ (a folder of diffusion_pytorch_model*.safetensors shards)" if role != "dit"
               else f"diffusion_pytorch_model*.safetensors (the {task.name} DiT shards)"
               for role, path in dits.items() if not _has_dit_weights(path)]
    missing += [path.name for path in (files["text_encoder"], files["vae"]) if not path.is_file()]
    if not files["tokenizer"].is_dir():
        missing.append(f"{TOKENIZER_DIR.as_posix()}/ (the umt5 tokenizer folder)")
    if "audio_encoder" in files and not (files["audio_encoder"] / "config.json").is_file():
        missing.append(f"{task.extra['wav2vec']}/ (the wav2vec2 audio encoder folder)")
    if missing:
        raise FileNotFoundError(f"{root} is not a complete official {task.name} folder; missing: "
                                f"{'; '.join(missing)}. Download the whole Wan2.2 {task.name} release into it")
    return files


def load_task_models(task: Union[str, TaskConfig], ckpt_dir: Union[str, os.PathLike], *,
                     dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device, None] = None,
                     t5_cpu: bool = False, offload_model: bool = False, quant: Optional[str] = None,
                     text_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32) -> TaskModels:
    """Load a task's DiT expert(s), text encoder and VAE from the official folder layout.

    `dtype`: the DiTs' weight dtype (`quant` "fp8_e4m3fn"/"fp8_e5m2" keeps their block linears
    in fp8). `device`: where sampling runs (default CUDA when available, else CPU).
    `offload_model`: the DiTs, and unless `t5_cpu` the text encoder, wait on the CPU and visit
    `device` only while they run (the VAE stays on `device`). `t5_cpu`: the text encoder
    always runs on the CPU (the reference's --t5_cpu). The reference keeps the text encoder in
    bf16 and the VAE in float32 (`text_dtype`, `vae_dtype`).
    """
    from wan_core.loading import load_dit, read_dit_config
    from wan_core.text import load_text_encoder
    from wan_core.vae import load_vae

    task = resolve_task(task)
    files = checkpoint_files(task, ckpt_dir)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = torch.device("cpu")
    dit_device = cpu if offload_model else device
    roles = ("high_noise", "low_noise") if task.is_moe else ("dit",)
    # Every expert's variant from its header and then the small VAE, before any weights move:
    # a wrong folder fails in a second, not after tens of GB have loaded.
    for role in roles:
        model_type = read_dit_config(files[role]).model_type
        if model_type != task.dit.model_type:
            raise ValueError(f"{files[role]} holds a {model_type} DiT, but {task.name} needs "
                             f"{task.dit.model_type}: is --ckpt_dir the {task.name} folder?")
    vae = load_vae(files["vae"], dtype=vae_dtype, device=device)
    if vae.version != task.vae_version:
        raise ValueError(f"{files['vae']} is a Wan{vae.version} VAE; {task.name} needs the Wan{task.vae_version} VAE")
    experts = tuple(load_dit(files[role], dtype=dtype, device=dit_device, quant=quant) for role in roles)
    text_encoder = load_text_encoder(files["text_encoder"], dtype=text_dtype,
                                     device=cpu if (t5_cpu or offload_model) else device,
                                     tokenizer=files["tokenizer"])
    audio_encoder = None
    if "audio_encoder" in files:  # float32 on the CPU, as the reference runs it
        from wan_core.audio import load_audio_encoder

        audio_encoder = load_audio_encoder(files["audio_encoder"])
    return TaskModels(task=task, experts=experts if task.is_moe else experts[0], vae=vae,
                      text_encoder=text_encoder, device=device, offload_model=offload_model, t5_cpu=t5_cpu,
                      audio_encoder=audio_encoder)
