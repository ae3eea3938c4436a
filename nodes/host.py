"""The one adapter between the pack and the program hosting it.

Inside ComfyUI this module reaches ComfyUI's services: the model folders (`folder_paths`), the
progress bar shown on the running node, the interrupt button, the devices ComfyUI chose, and its
model manager. Outside ComfyUI (tests, scripts) the same functions behave plainly: model folders
come from the `WAN22_MODELS_DIR` environment variable or `set_model_folders`, progress is not
reported, nothing interrupts, and models run on CUDA when there is one.

How ComfyUI's memory requests reach our models (read from ComfyUI's `main.py`, `server.py` and
`comfy/model_management.py`):
- "Unload models" (`POST /free {"unload_models": true}`), an out-of-memory error, and another
  model needing room all end in `model_management.free_memory`, which unloads the entries of
  `model_management.current_loaded_models`. A model gets there only as a `ModelPatcher` passed to
  `model_management.load_models_gpu`, so `load_to_compute` registers each of our models that way
  (whole, never split between devices). ComfyUI then moves it to its offload device when it needs
  the room, and frees room for it by offloading its own models when we need it.
- "Free model and node cache" (`POST /free {"free_memory": true}`) also resets the executor's
  node-output cache, which drops the loader nodes' outputs. `ModelCache` holds models weakly, so
  once ComfyUI drops them nothing of ours keeps them in memory.
- A model that places its own weights (a `WanDiT`: block swap, host copies, patches; it has a
  `placement`) is hidden from the patcher's per-layer loading: the patcher sees one module with
  no parameters of its own, of the size we report (`HostedModel.set_device_bytes`: the resident
  part and the swap slots), whose moves go to the model's own `.to()`. `load_to_compute` asks
  for the activation memory on top (`memory_required`), so ComfyUI frees room for both first.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, TypeVar

import numpy as np
import torch

from wan_core.loading import INDEX_SUFFIX

try:  # ComfyUI puts its root folder on sys.path; elsewhere these imports fail.
    import folder_paths
    import comfy.model_management as _model_management
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
except ImportError:
    folder_paths = None

IN_COMFYUI = folder_paths is not None

MODELS_DIR_ENV = "WAN22_MODELS_DIR"
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")
# The model folders the pack reads, named as ComfyUI names them.
MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "audio_encoders", "loras")
# What a model is used for decides where ComfyUI puts it (it may keep text encoders on the CPU).
ROLES = ("diffusion", "text", "vae")

T = TypeVar("T")

# --- model folders --------------------------------------------------------------------------

_plain_folders: dict[str, list[Path]] = {}


def set_model_folders(kind: str, folders: Iterable[os.PathLike | str]) -> None:
    """Plain mode: the folders to search for models of `kind` (overrides WAN22_MODELS_DIR)."""
    _check_kind(kind)
    _plain_folders[kind] = [Path(f) for f in folders]


def model_folders(kind: str) -> list[Path]:
    """The folders searched for models of `kind` ("diffusion_models", "text_encoders", "vae", …)."""
    _check_kind(kind)
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    if kind in _plain_folders:
        return list(_plain_folders[kind])
    root = os.environ.get(MODELS_DIR_ENV)
    return [Path(root) / kind] if root else []


def list_models(kind: str) -> list[str]:
    """File names (relative to their folder, "/"-separated) of the models of `kind`, sorted.

    A sharded checkpoint (an official release folder: `*.safetensors.index.json` beside its
    shards) is one entry, its index file; shards are never offered alone, since none loads by
    itself (a shard is a file its folder's index names, or one named `*-00001-of-00006.*`)."""
    _check_kind(kind)
    if IN_COMFYUI:
        names = set(folder_paths.get_filename_list(kind))
    else:
        names = set()
        for folder in model_folders(kind):
            if folder.is_dir():
                for path in folder.rglob("*"):
                    if path.suffix.lower() in MODEL_EXTENSIONS and path.is_file():
                        names.add(path.relative_to(folder).as_posix())
    indexes, shards = _sharded_checkpoints(kind)
    return sorted((names - shards - {n for n in names if SHARD_NAME.search(n)}) | indexes)


SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.[a-z]+$", re.IGNORECASE)


def _sharded_checkpoints(kind: str) -> tuple[set[str], set[str]]:
    """(index files, the shards they name), relative to the `kind` folders."""
    indexes, shards = set(), set()
    for folder in model_folders(kind):
        if not folder.is_dir():
            continue
        for index in folder.rglob(f"*{INDEX_SUFFIX}"):
            relative = index.relative_to(folder)
            indexes.add(relative.as_posix())
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            except (OSError, ValueError, AttributeError):
                continue  # listed anyway: loading it reports what is wrong with it
            shards.update((relative.parent / str(shard)).as_posix() for shard in set(weight_map.values()))
    return indexes, shards


def model_path(kind: str, name: str) -> Path:
    """The full path of model file `name` in the `kind` folders; FileNotFoundError if absent."""
    _check_kind(kind)
    if IN_COMFYUI:
        full = folder_paths.get_full_path(kind, name)
        if full is not None:
            return Path(full)
    for folder in model_folders(kind):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model {name!r} not found in models/{kind}; put the file there and press "
                            f"Refresh, or pick one of {list_models(kind)[:10]}")


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {MODEL_KINDS}")


# --- progress and interruption --------------------------------------------------------------

class Progress:
    """Progress of one long node run: in ComfyUI the node's bar (with an optional preview
    picture) and a console line per update (`label` names the work, e.g. "Wan2.2 sampling");
    silent elsewhere."""

    def __init__(self, total: int, label: str = ""):
        self.total = int(total)
        self.current = 0
        self.label = label
        self._bar = _comfy_utils.ProgressBar(self.total) if IN_COMFYUI else None
        self._console = None

    def update(self, steps: int = 1) -> None:
        self.set(self.current + steps)

    def set(self, current: int, total: Optional[int] = None, preview: Optional[np.ndarray] = None) -> None:
        """Show `current` of `total`; `preview` an [H, W, 3] uint8 picture for the node (shown
        only when the host's preview setting allows)."""
        if total is not None:
            self.total = int(total)
        self.current = min(int(current), self.total)
        if self._bar is not None:
            shown = _preview_payload(preview) if preview is not None else None
            self._bar.update_absolute(self.current, self.total, shown)
            self._print_console_line()

    def _print_console_line(self) -> None:
        from tqdm import tqdm

        if self._console is None:
            self._console = tqdm(total=self.total, desc=self.label or "Wan2.2", unit="step", file=sys.stderr,
                                 dynamic_ncols=True)
        self._console.total = self.total
        self._console.update(self.current - self._console.n)
        if self.current >= self.total:
            self._console.close()


def previews_enabled() -> bool:
    """Whether the host wants sampler previews: ComfyUI's preview method (its --preview-method,
    or the client's per-prompt choice) is not "none"; never outside ComfyUI."""
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def _preview_payload(picture: np.ndarray):
    """What ComfyUI's progress bar takes as a preview: ("JPEG", PIL image, max size)."""
    from PIL import Image
    from comfy.cli_args import args

    return "JPEG", Image.fromarray(picture), args.preview_size


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel; nothing in plain mode."""
    if IN_COMFYUI:
        _model_management.throw_exception_if_processing_interrupted()


def interrupt_requested() -> bool:
    """Whether the user pressed Cancel (ComfyUI; never in plain mode), without clearing it."""
    return IN_COMFYUI and _model_management.processing_interrupted()


def step_callback(total: int) -> Callable[..., None]:
    """A per-step callback for long loops: stops on interrupt, then advances the progress bar."""
    progress = Progress(total)

    def on_step(*_args: Any, **_kwargs: Any) -> None:
        check_interrupt()
        progress.update(1)

    on_step.progress = progress
    return on_step


def progress_callback(label: str = "") -> Callable[..., None]:
    """A callback for wan_core's loops, called as `callback(done, total, ...)` after each
    step: stops on interrupt, then shows done/total on the node's bar and the console."""
    progress = Progress(0, label)

    def on_progress(done: int, total: int, *_args: Any, preview: Optional[np.ndarray] = None) -> None:
        check_interrupt()
        progress.set(done, total, preview)

    on_progress.progress = progress
    return on_progress


# --- devices and model placement -----------------------------------------------------------

def compute_device(role: str) -> torch.device:
    """Where a model of `role` runs: ComfyUI's choice, else CUDA when present, else the CPU."""
    _check_role(role)
    if IN_COMFYUI:
        if role == "text":
            return _model_management.text_encoder_device()
        if role == "vae":
            return _model_management.vae_device()
        return _model_management.get_torch_device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def offload_device(role: str) -> torch.device:
    """Where a model of `role` waits between uses (and is first loaded to)."""
    _check_role(role)
    if IN_COMFYUI:
        if role == "text":
            return _model_management.text_encoder_offload_device()
        if role == "vae":
            return _model_management.vae_offload_device()
        return _model_management.unet_offload_device()
    return torch.device("cpu")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")


class HostedModel:
    """A loaded model the host may move between its compute and offload devices.

    `model` is the wan_core object the nodes use; `module` the torch module holding its
    weights (the model itself unless given). In ComfyUI the module is wrapped in a
    `ModelPatcher` so that ComfyUI's model manager accounts for it and can unload it; the
    patcher lives exactly as long as this object.
    """

    def __init__(self, model: Any, role: str, *, module: Optional[torch.nn.Module] = None,
                 device: Optional[torch.device] = None, label: str = ""):
        _check_role(role)
        self.model = model
        self.module = module if module is not None else model
        self.role = role
        self.label = label or type(self.module).__name__
        self.device = torch.device(device) if device is not None else compute_device(role)
        self._patcher = None
        if IN_COMFYUI:
            if _places_itself(self.module):  # sized as fully resident until told otherwise
                managed = _named(_SelfPlacing, self.label)(self.module)
                size = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
            else:
                managed, size = _named(_Managed, self.label)(self.module), 0  # 0: the patcher measures it
            self._patcher = _model_patcher.ModelPatcher(
                managed, load_device=self.device, offload_device=offload_device(role), size=size)

    def set_device_bytes(self, nbytes: int) -> None:
        """The device memory this model takes when loaded (what ComfyUI accounts for it)."""
        if self._patcher is not None:
            self._patcher.size = int(nbytes)


def _places_itself(module: torch.nn.Module) -> bool:
    return hasattr(module, "placement")


class _Managed(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: a plain module holding ours. The patcher writes
    bookkeeping attributes (`device`, `model_lowvram`, …) onto the module it is given, and our
    models expose `device` as a read-only property."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def _named(kind: type, label: str) -> type:
    """A subclass of `kind` named after what it holds: ComfyUI's console says "Requested to load
    <class name>", which should read e.g. "Wan2.2 t2v-A14B DiT (wan2.2_t2v_...)"."""
    return type(label, (kind,), {"__module__": __name__})


class _SelfPlacing(torch.nn.Module):
    """What the patcher manages for a model that places its own weights: no submodules or
    parameters it could move one layer at a time (it would copy host weights back and forth);
    every move it makes is handed to the model's own `.to()`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", module)  # not registered: invisible to the patcher

    def _apply(self, fn, recurse: bool = True):
        self.inner._apply(fn, recurse)
        return self


def load_to_compute(models: Iterable[HostedModel], memory_required: int = 0) -> None:
    """Put whole models on their compute devices before use; ComfyUI frees room for them and
    for `memory_required` bytes of working memory beside them."""
    models = list(models)
    if IN_COMFYUI:
        patchers = [m._patcher for m in models]
        _model_management.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)
        return
    for m in models:
        m.module.to(m.device)


def free_device_memory(nbytes: int, device: torch.device, keep: Iterable[HostedModel] = ()) -> None:
    """Ask the host to make `nbytes` free on `device` by unloading other models (not `keep`)."""
    if IN_COMFYUI and device.type != "cpu":
        patchers = [m._patcher for m in keep]
        kept = [loaded for loaded in _model_management.current_loaded_models
                if any(loaded.model is p for p in patchers)]
        _model_management.free_memory(int(nbytes), device, keep_loaded=kept)


def device_free_bytes(device: torch.device) -> int:
    """Free memory on `device` as the host reports it (ComfyUI's own figure when hosted)."""
    if IN_COMFYUI:
        return int(_model_management.get_free_memory(device))
    if device.type == "cuda":
        from wan_core.offload.budget import device_free_bytes as torch_free_bytes

        return torch_free_bytes(device)
    return 0


def offload(models: Iterable[HostedModel]) -> None:
    """Move models to their offload devices now (ComfyUI forgets them as loaded)."""
    models = list(models)
    if IN_COMFYUI:
        patchers = [m._patcher for m in models]
        loaded = _model_management.current_loaded_models
        for i in reversed(range(len(loaded))):
            if any(loaded[i].model is p for p in patchers):
                loaded[i].model_unload()
                loaded.pop(i)
        return
    for m in models:
        m.module.to(offload_device(m.role))


class MemoryClaim:
    """GPU memory held outside this process (the multi-GPU worker processes), made known to
    ComfyUI's model manager: when ComfyUI frees memory ("Unload models", "Free model and node
    cache", room for another model) it unloads the claim, which calls `release()` once.

    ComfyUI unloads only models registered as a `ModelPatcher`; the claim is one around an empty
    module with an ON_DETACH callback (ComfyUI's patcher callbacks). Plain mode: nothing frees
    memory, `release` is never called. `drop()` withdraws the claim without calling `release`.
    """

    def __init__(self, release: Callable[[], None]):
        self._patcher = None
        if IN_COMFYUI:
            from comfy.patcher_extension import CallbacksMP

            self._patcher = _model_patcher.ModelPatcher(_Managed(torch.nn.Module()), load_device=compute_device("diffusion"),
                                                        offload_device=offload_device("diffusion"))
            self._patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: release())
            _model_management.load_models_gpu([self._patcher])

    def drop(self) -> None:
        if self._patcher is not None:
            loaded = _model_management.current_loaded_models
            for i in reversed(range(len(loaded))):
                if loaded[i].model is self._patcher:
                    loaded.pop(i)
            self._patcher = None


def empty_device_cache() -> None:
    """Return freed device memory to the driver (ComfyUI's way when hosted)."""
    if IN_COMFYUI:
        _model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the model cache -------------------------------------------------------------------------

class ModelCache:
    """Loaded models by (path, options), so one file is loaded once however many nodes ask.

    Entries are weak: whoever uses a model (ComfyUI's node-output cache, a script) owns it,
    and when the owner lets go — ComfyUI does on "Free model and node cache" — it is freed
    without waiting for us. `clear()` forgets every entry.
    """

    def __init__(self) -> None:
        self._entries: "weakref.WeakValueDictionary[Hashable, Any]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get_or_load(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                return found
            loaded = load()
            self._entries[key] = loaded
            return loaded

    def keys(self) -> list[Hashable]:
        return list(self._entries.keys())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


model_cache = ModelCache()


# --- HTTP routes for the web extension ---------------------------------------------------------

def add_get_route(path: str, handler: Callable[[dict[str, str]], Any]) -> bool:
    """Serve `GET path` on ComfyUI's server: `handler(query) -> JSON-able`, or ValueError/
    FileNotFoundError for a 400 answer {"error": message}; any other failure is a 500 answer
    with a short message (the traceback goes to the log). Returns False outside ComfyUI."""
    if not IN_COMFYUI:
        return False
    from aiohttp import web
    import server

    async def serve(request):
        try:
            return web.json_response(handler(dict(request.rel_url.query)))
        except (ValueError, FileNotFoundError) as err:
            return web.json_response({"error": str(err)}, status=400)
        except Exception as err:  # the details go to the server's log, not to the browser
            logging.getLogger(__name__).exception("GET %s failed", path)
            return web.json_response({"error": f"the server failed ({type(err).__name__}); see its console"},
                                     status=500)

    server.PromptServer.instance.routes.get(path)(serve)
    return True


def _cache_status(_query: dict[str, str]) -> dict:
    return {"models": [[str(part) for part in key] for key in model_cache.keys()]}


# What the pack holds in memory, for diagnostics and the real-host tests.
add_get_route("/wan22/cache", _cache_status)
