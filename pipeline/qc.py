"""Quality control of the preprocessing: the QC limits table, value checks and image QC.

:data:`QC_LIMITS` is the one table of the QC values :func:`pipeline.preprocess.preprocess`
measures and the :class:`~pipeline.preprocess_config.PreprocessConfig` fields that limit
them; :func:`qc_checks` pairs measured values with their limits for reports.  The
checks raise :class:`~core.errors.NotAnalysed` (``QC_FAILED``) with "measured X,
limit Y".

See Also
--------
pipeline.preprocess : The stage that runs these checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from core.errors import NotAnalysed, Outcome
from pipeline.preprocess_config import PreprocessConfig


@dataclass(frozen=True)
class QCLimit:
    """One QC value of :func:`pipeline.preprocess.preprocess` and the :class:`PreprocessConfig` field that limits it.

    Parameters
    ----------
    key : str
        Key in :attr:`pipeline.preprocess.Preprocessed.qc`.
    label : str
        What a reader calls it ("slice thickness").
    config_field : str
        The :class:`PreprocessConfig` field holding the limit.
    comparison : {">=", "<="}
        A value passes when ``value <comparison> limit``.
    unit : str
        Suffix of value and limit when printed (" mm"), empty for ratios and counts.
    """

    key: str
    label: str
    config_field: str
    comparison: Literal[">=", "<="]
    unit: str = ""

    def limit(self, config: PreprocessConfig) -> float:
        """The limit *config* sets."""
        return float(getattr(config, self.config_field))


#: The one table of QC values and their limits (the order in which they are shown).
QC_LIMITS: tuple[QCLimit, ...] = (
    QCLimit("slices", "slices", "min_slices", ">="),
    QCLimit("slice_thickness_mm", "slice thickness", "max_slice_thickness_mm", "<=", " mm"),
    QCLimit("correlation", "template correlation", "min_correlation", ">="),
    QCLimit("coverage", "brain coverage", "min_coverage", ">="),
    QCLimit("wm_gm_ratio", "WM/GM ratio", "min_wm_gm_ratio", ">="),
)


@dataclass(frozen=True)
class QCCheck:
    """A measured QC value next to its limit."""

    key: str
    label: str
    value: float
    limit: float
    comparison: Literal[">=", "<="]
    unit: str = ""

    @property
    def ok(self) -> bool:
        """Whether the value is within its limit."""
        return self.value >= self.limit if self.comparison == ">=" else self.value <= self.limit

    @property
    def measured(self) -> str:
        """The value as a reader sees it: slices as a count, a length in its unit to 0.01, a ratio to 0.001."""
        digits = 0 if self.key == "slices" else 2 if self.unit else 3
        return f"{self.value:.{digits}f}{self.unit}"


def qc_checks(qc: dict[str, float], config: PreprocessConfig) -> tuple[QCCheck, ...]:
    """The measured QC values of :attr:`~pipeline.preprocess.Preprocessed.qc` with their limits, in QC_LIMITS order.

    Parameters
    ----------
    qc : dict of str to float
        Measured values (keys missing from it are left out).
    config : PreprocessConfig
        The limits the values were checked against.

    Returns
    -------
    tuple of QCCheck
        One entry per measured value.
    """
    return tuple(QCCheck(q.key, q.label, float(qc[q.key]), q.limit(config), q.comparison, q.unit)
                 for q in QC_LIMITS if q.key in qc)


def qc_fail(what: str, measured: float, limit: float, unit: str = "") -> NotAnalysed:
    """The ``QC_FAILED`` refusal naming *what* failed, its measured value and its limit."""
    return NotAnalysed(Outcome.QC_FAILED, f"{what}: measured {measured:.3g}{unit}, limit {limit:.3g}{unit}")


def check_values(stage: str, values: NDArray[np.floating]) -> None:
    """Refuse NaN/Inf, and an image without positive signal, after *stage*.

    Raises
    ------
    NotAnalysed
        ``QC_FAILED`` naming the stage, so that a bad value never travels on silently.
    """
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise NotAnalysed(Outcome.QC_FAILED, f"image values not finite after {stage} ({bad} voxels are NaN or "
                                             "infinite)")
    top = float(values.max()) if values.size else 0.0
    if top <= 0.0 or top <= float(values.min()):
        raise NotAnalysed(Outcome.QC_FAILED, f"image has no signal after {stage} (constant or not positive)")


def pearson(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    """Pearson correlation, 0 for a constant input."""
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def image_qc(warped: NDArray[np.float32], template: NDArray[np.float32], coverage: NDArray[np.float32],
              config: PreprocessConfig) -> dict[str, float]:
    """Correlation, brain coverage and white/grey ratio of the registered image, checked against *config*.

    Raises
    ------
    NotAnalysed
        ``QC_FAILED`` (:func:`qc_fail`) for the first value outside its limit.
    """
    brain = template > 0
    t = template[brain]
    w = warped[brain]
    correlation = pearson(w, t)
    covered = float(np.mean(coverage[brain] > 0.5))
    wm = w[t >= np.percentile(t, 80)]
    gm = w[(t >= np.percentile(t, 30)) & (t <= np.percentile(t, 50))]
    ratio = float(np.mean(wm) / np.mean(gm)) if np.mean(gm) > 0 else 0.0
    qc = {"correlation": correlation, "coverage": covered, "wm_gm_ratio": ratio}
    if covered < config.min_coverage:
        raise qc_fail("brain not covered (fraction of the template brain in the field of view)",
                      covered, config.min_coverage)
    if ratio < config.min_wm_gm_ratio:
        raise qc_fail("not T1 contrast (white/grey matter intensity ratio)", ratio, config.min_wm_gm_ratio)
    if correlation < config.min_correlation:
        raise qc_fail("registration to the template failed (correlation)", correlation, config.min_correlation)
    return qc
