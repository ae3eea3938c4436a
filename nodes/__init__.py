"""The pack's ComfyUI nodes. Imported relatively by the pack's root __init__."""
import os
import sys

# ComfyUI imports the pack by path, so the plain-PyTorch library beside this folder is
# not on sys.path unless the pack was pip-installed; make `import wan_core` work either way.
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from . import loaders, lora, parallel, prompt_extend, s2v, samplers  # noqa: E402

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loaders, lora, samplers, parallel, prompt_extend, s2v):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
