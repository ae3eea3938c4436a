"""What the tiny-checkpoint factories share: seeded random weights for a model's names and
shapes, and writing one checkpoint file the way the real single-file releases are written."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import save_file


def write_single_file(path: Path, stem: str, tensors: dict[str, torch.Tensor], *, as_pickle: bool,
                      metadata: Optional[dict[str, str]] = None) -> Path:
    """Save `tensors` as a .pth (`as_pickle`) or .safetensors file. `path` is the file, a file
    name without suffix (the suffix is added) or an existing folder (the file is `stem` in it)."""
    suffix = ".pth" if as_pickle else ".safetensors"
    if path.is_dir():
        path = path / f"{stem}{suffix}"
    elif not path.suffix:
        path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_pickle:
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path), metadata=metadata or None)
    return path


# How a weight's random value is drawn: a gain (norm weights) 1 + N(0, 0.2^2), a matrix or
# kernel N(0, 1/fan_in), anything else (biases, modulation tables) N(0, 0.2^2). Large enough
# that a wrong or swapped tensor changes a model's output.
WeightKind = str  # "gain" | "matrix" | "other"


def random_state_dict(build: Callable[[], torch.nn.Module], kind: Callable[[str, torch.Size], WeightKind], *,
                      dtype: torch.dtype, seed: int, device: Union[str, torch.device]) -> dict[str, torch.Tensor]:
    """Seeded random values for every entry of `build().state_dict()` (built on the meta device,
    so full-size models cost nothing). On the meta device only names and shapes are made."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build().state_dict().items()}
    if torch.device(device).type == "meta":
        return {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        weight_kind = kind(name, shape)
        if weight_kind == "gain":
            value = 1 + 0.2 * noise
        elif weight_kind == "matrix":
            value = noise / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.2 * noise
        out[name] = value.to(device=device, dtype=dtype)
    return out
