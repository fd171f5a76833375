"""What this process knows about its Metal kernels: which are switched off (a variant failed its self-check or its
first real launch) and which variants passed their first launch.

A variant's first launch in a process is evaluated at once and compared with the twin on the same inputs; a build
error, a GPU error or a result that disagrees switches that kernel to the twin for the rest of the process, with
one warning, and the twin's result is used in its place, so no token is lost and the output stays the target's.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from .check import VariantCheck, disagreement
from .metal import SWITCHES, Variant


class Guard:
    def __init__(self) -> None:
        self.off: dict[str, str] = {}  # kernel -> why it no longer runs in this process
        self.passed: set[Variant] = set()  # variants whose first launch agreed with the twin
        self.checks: dict[str, VariantCheck] = {}  # every variant checked, by name: what `doctor` reports

    def runs(self, kernel: str) -> bool:
        return kernel not in self.off

    def record(self, checks: list[VariantCheck]) -> None:
        """Self-check results (check.py): a failed variant switches its kernel off."""
        for result in checks:
            self.checks[result.variant] = result
            if not result.ok:
                self.switch_off(result.variant.split("(")[0], f"{result.variant}: {result.detail}")

    def switch_off(self, kernel: str, why: str) -> None:
        if kernel in self.off:
            return
        self.off[kernel] = why
        warnings.warn(f"ddtree-mlx: the Metal kernel {kernel} failed ({why}); the pure-MLX twin runs instead for the "
                      f"rest of this process, with the same output. DDTREE_{SWITCHES[kernel].upper()}=0 skips the "
                      "kernel; please report this with the output of `ddtree-mlx doctor --json`.", RuntimeWarning,
                      stacklevel=3)

    def first_launch(self, variant: Variant, kernel: Callable[[], Any], twin: Callable[[], Any],
                     pairs: Callable[[Any, Any], list], dtype: str) -> tuple[Any, bool]:
        """The kernel's result, once a variant's first launch has shown it agrees with the twin; else the twin's.
        Returns (result, whether the kernel's)."""
        if variant in self.passed:
            return kernel(), True
        reference = twin()
        try:
            ours = kernel()
            ratio = disagreement(pairs(ours, reference), dtype)
        except Exception as error:  # noqa: BLE001 - a build or GPU error: the twin's result stands
            detail = f"could not build or run at its first launch: {type(error).__name__}: {error}"
        else:
            if ratio <= 1.0:
                self.passed.add(variant)
                self.checks.setdefault(str(variant), VariantCheck(str(variant), True, "first launch agreed"))
                return ours, True
            detail = f"its first launch disagreed with the twin ({ratio:.3g}x the tolerance)"
        self.checks[str(variant)] = VariantCheck(str(variant), False, detail)
        self.switch_off(variant.kernel, f"{variant}: {detail}")
        return reference, False


GUARD = Guard()  # one per process, as MLX's compiled kernels are
