"""What is done to one raw frame: its overscan, trim and the masters (by name) to apply.

Plan data: built by :mod:`ccdcal.planning.plan`, read by the calibration and the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sections import Section
from .overscan import OverscanSpec


@dataclass(frozen=True)
class Recipe:
    """What is done to one raw frame: overscan, trim, and the masters (by name) to apply."""

    overscan: OverscanSpec | None = None
    trim: Section | None = None
    bias: str | None = None
    dark: str | None = None
    dark_scale: float = 0.0
    flat: str | None = None

    def describe(self) -> str:
        parts = []
        if self.overscan is not None:
            parts.append(self.overscan.describe())
        if self.trim is not None:
            parts.append(f"trim {self.trim}")
        if self.bias:
            parts.append("bias")
        if self.dark:
            parts.append(f"dark ×{self.dark_scale:.3g}")
        if self.flat:
            parts.append("flat")
        return ", ".join(parts) if parts else "as is"
