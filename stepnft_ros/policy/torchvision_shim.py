"""Lets a torchvision whose C++ ops cannot load next to this torch still be imported.

PyPI's only torchvision for torch 2.13 is built against the CUDA torch. Next to the CPU torch its
`_C` extension fails to load; torchvision tolerates that for every op except `nms` and `qnms`,
whose fake (meta) kernels it registers unconditionally, so `import torchvision` raises
"operator torchvision::nms does not exist". transformers imports torchvision whenever it is
installed (the FlowVLA text encoder, SmolVLM's processors) and LeRobot imports it always.

`ensure_torchvision_importable()` loads the extension the way torchvision does first; only when
that fails does it declare the two op schemas (no kernels), which is all the import needs.
torchvision's pure-Python parts (transforms, which SmolVLA uses) then work; its compiled ops
(nms, roi_align, ...) still raise torchvision's own "Couldn't load custom C++ ops" error, which
nothing in this project calls. `stepnft_ros.policy` runs it on import, before any transformers
or LeRobot import.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# The ops torchvision (0.2x) registers fake kernels for whether or not its extension loaded.
_UNGUARDED_OPS = (
    'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
)
_library = None  # the torch.library fragment holding the schemas; kept alive for the process


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's unguarded op schemas if its extension cannot load here.

    Returns True when it declared them, False when nothing was needed (torchvision absent, already
    imported, or its extension loads). Idempotent.
    """
    global _library
    if _library is not None or 'torchvision' in sys.modules:
        return False
    spec = importlib.util.find_spec('torchvision')
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    folder = list(spec.submodule_search_locations)[0]
    extension = next((os.path.join(folder, f) for f in sorted(os.listdir(folder))
                      if f.startswith('_C.') and f.endswith(('.so', '.pyd'))), None)
    if extension is not None:
        try:
            torch.ops.load_library(extension)  # what torchvision.extension does; a repeat load is a no-op
            return False
        except (ImportError, OSError):
            pass
    _library = torch.library.Library('torchvision', 'FRAGMENT')
    for schema in _UNGUARDED_OPS:
        _library.define(schema)
    return True
