"""Usage reporting of MedSR's dependencies switched off, in this process, before they load.

A medical tool must not send anything anywhere. What the dependencies would send, and how each
is stopped here (nothing is written to the user's home folder):

- OpenVINO's model conversion (`openvino.tools.ovc`) and NNCF report usage to Google Analytics
  through the `openvino_telemetry` package unless a consent file in the home folder says no
  (`opt_in_out --opt_out` writes it). Both import that package inside `try/except ImportError`
  and fall back to a no-op stub: marking it as not importable (`sys.modules[...] = None`)
  selects the stub. Where it was imported already, its consent check is made to answer "declined".
- Ray sends usage statistics from a cluster it starts unless `RAY_USAGE_STATS_ENABLED=0`.
- MONAI, torch, SimpleITK, pydicom: no usage reporting.

`MEDSR_ALLOW_TELEMETRY=1` leaves every dependency as it is.
"""

from __future__ import annotations

import os
import sys

#: Environment variables set (unless the user set them) to switch reporting off.
ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0"}
#: Packages that only report usage: made unimportable, so their users take their no-op stubs.
BLOCKED_MODULES = ("openvino_telemetry",)


def disable() -> None:
    """Switch off the dependencies' usage reporting for this process (idempotent)."""
    if os.environ.get("MEDSR_ALLOW_TELEMETRY") == "1":
        return
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for name in BLOCKED_MODULES:
        loaded = sys.modules.get(name)
        if loaded is None:
            sys.modules[name] = None  # type: ignore[assignment]  # import -> ImportError
        else:
            _decline_loaded_openvino_telemetry(loaded)


def _decline_loaded_openvino_telemetry(module) -> None:
    """An already imported `openvino_telemetry`: its consent check answers "declined" and the
    existing Telemetry object (a singleton) stops sending."""
    try:
        from openvino_telemetry.utils import opt_in_checker
        declined = opt_in_checker.ConsentCheckResult.DECLINED
        opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: declined
        telemetry = getattr(module, "Telemetry", None)
        instance = getattr(telemetry, "_SingletonMetaClass__single_instance", None)
        if instance is not None:
            instance.consent = False
    except Exception:  # noqa: BLE001 - an unknown version: nothing more can be done here
        pass


disable()
