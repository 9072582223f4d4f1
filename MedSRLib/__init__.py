"""MedSRLib: deep-learning super-resolution of medical volumes (no Slicer, Qt or VTK here).

Public API: `upscale`, `read_volume`, `write_volume`, `list_models`, `CancelToken`.
"""

from .api import list_models, upscale
from .engine import CancelToken
from .errors import CancelledError, InputError, MedSRError, WeightsError
from .io import read_volume, write_volume

__all__ = ["upscale", "read_volume", "write_volume", "list_models", "CancelToken",
           "MedSRError", "InputError", "WeightsError", "CancelledError"]
__version__ = "0.1.0"
