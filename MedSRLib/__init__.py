"""MedSRLib: deep-learning super-resolution of medical volumes (no Slicer, Qt or VTK here).

Public API: `upscale`, `read_volume`, `write_volume`, `write_dicom_series`, `list_models`,
`CancelToken`, and `batch` (a cohort: a resumable loop around `upscale`, on Ray when installed).
The names are imported on first use (PEP 562), so `import MedSRLib.cli` stays light and an
early Ctrl-C in the `medsr` command is a clean cancel, not a traceback from inside torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import CancelledError, InputError, MedSRError, WeightsError

_LAZY = {"upscale": ".api", "list_models": ".api", "CancelToken": ".runtime.engine",
         "read_volume": ".io.volumes", "write_volume": ".io.volumes",
         "write_dicom_series": ".io.dicom_export",
         "batch": ".cohort"}

__all__ = ["upscale", "read_volume", "write_volume", "write_dicom_series", "list_models",
           "CancelToken", "batch", "MedSRError", "InputError", "WeightsError", "CancelledError"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import list_models, upscale
    from .cohort import batch
    from .io.dicom_export import write_dicom_series
    from .runtime.engine import CancelToken
    from .io.volumes import read_volume, write_volume


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
