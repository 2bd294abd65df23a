"""The hypothesis settings profiles every peft-core test suite shares.

Call :func:`register_profiles` from a ``conftest.py``; ``HYPOTHESIS_PROFILE`` picks one:

========================  =============================================================
``dev`` (the default)     10 examples per check: quick local runs
``ci``                    25 examples per check
``derandomized``          25 examples from a fixed seed: reproducible third-party CI
========================  =============================================================

No profile has a deadline: the first forward of a model (lazy imports, kernel selection) is
much slower than the next ones, which would make timings flaky, not informative.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument

__all__ = ["PROFILES", "quiet_health_checks", "register_profiles"]

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]


def quiet_health_checks() -> list[HealthCheck]:
    """Health checks the kit turns off: building even a tiny model is "slow" to hypothesis."""
    return list(_QUIET)


PROFILES = {
    "dev": settings(max_examples=10, deadline=None, suppress_health_check=_QUIET),
    "ci": settings(max_examples=25, deadline=None, suppress_health_check=_QUIET),
    "derandomized": settings(max_examples=25, deadline=None, suppress_health_check=_QUIET, derandomize=True),
}


def register_profiles(default: str = "dev") -> str:
    """Register ``dev``, ``ci`` and ``derandomized``; load ``$HYPOTHESIS_PROFILE`` (or ``default``).

    Returns the name of the loaded profile. An unknown name is an error that lists the choices.
    """
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)
    name = os.environ.get("HYPOTHESIS_PROFILE") or default
    if name not in PROFILES:
        try:
            settings.get_profile(name)  # a profile the project registered itself
        except InvalidArgument:
            raise ValueError(
                f"HYPOTHESIS_PROFILE={name!r} is not a registered profile; use one of {sorted(PROFILES)}."
            ) from None
    settings.load_profile(name)
    return name
