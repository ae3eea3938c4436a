"""Writing one checkpoint file the way the real single-file releases are written."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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
