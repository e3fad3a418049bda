"""Online calibration of predicted step energy against measured (NVML) energy.

The predictor gives, for a window of engine steps, a prefill energy ``P`` and a decode energy
``D`` (joules); the window also has ``I`` idle seconds in which no step ran. NVML measures the
window's real energy ``M``. We learn

    M ≈ a·P + b·D + c·I        (a, b: per-phase scales; c: idle watts)

with recursive least squares (RLS) and a forgetting factor, so the fit follows drift such as a
vLLM upgrade that cuts energy by 40%.

Choices, and why:

* Each window's equation is divided by a scale ``s`` (the current calibrated total), so the
  regression is in *relative* error: NVML noise is roughly proportional to the energy, and one
  window then weighs about "one unit of information" whatever its length. Prior strengths and
  the robust scale are expressed in those units.
* The estimate is regularised towards the prior (a=b=1, c=prior idle watts) with a strength of
  ``prior_strength`` windows. Like plain RLS the prior is forgotten as data arrive, but only down
  to a floor ``F`` that is re-added every update (``R ← λR + (1-λ)F + w·x·xᵀ``), so the
  information matrix never drops below ``F``: the covariance stays bounded (no wind-up with
  forgetting), the first few windows cannot produce wild values, and directions the data do not
  excite (prefill and decode collinear) stay anchored instead of diverging. A full-strength
  constant prior would instead shrink weakly excited directions (a - b) towards a = b.
* The prior correlates a and b (ρ = 0.5), because most miscalibration (clocks, kernels, software
  versions) scales both phases together: when P and D are collinear the update moves both scales
  together rather than loading the whole correction onto one phase.
* Robustness: the one-step-ahead residual is standardised by a robust scale (MAD of recent
  residuals) and the predictive spread; a Huber weight shrinks the gain of large residuals, and
  once ``MIN_WINDOWS_BEFORE_REJECTING`` windows are learnt, residuals beyond
  ``outlier_threshold`` sigmas are rejected (counter glitches, clock changes mid-window).
* A real step change also looks like a run of outliers (rejected, or learnt with a tiny Huber
  weight against ~50 windows of history: either way adaptation would crawl).
  ``REGIME_CHANGE_WINDOWS`` consecutive windows beyond ``SUSPECT_SIGMAS`` with the same sign are
  taken as a regime change: the data information is dropped
  (back to the prior) and the held windows are replayed, so the calibrator re-learns within a
  handful of windows instead of rejecting the new regime forever.
* Coefficients stay physical: scales clipped to [0.05, 20], idle watts >= 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "CalibrationFileError",
    "CalibrationState",
    "OnlineCalibrator",
    "fit_offline",
    "STATE_VERSION",
]

STATE_VERSION: int = 1
SCALE_MIN: float = 0.05
SCALE_MAX: float = 20.0
# Outliers are only rejected after this many windows: before that the robust scale has too few
# residuals, and the large early residuals are the bias we are here to learn.
MIN_WINDOWS_BEFORE_REJECTING: int = 10
# Consecutive same-sign suspect windows (standardised residual beyond SUSPECT_SIGMAS) read as a
# regime change; noise (p ~ 0.001 per window at 3 sigma) and random glitches (a few % of windows,
# either sign) almost never line up five in a row.
REGIME_CHANGE_WINDOWS: int = 5
SUSPECT_SIGMAS: float = 3.0
# Huber tuning constant (standardised residual beyond which the gain shrinks as 1/|r|).
HUBER_K: float = 2.0
# Prior correlation of prefill and decode scales (see module docstring).
PRIOR_SCALE_CORRELATION: float = 0.5
# The idle prior counts as ``prior_strength`` windows in which idle is this share of the energy;
# idle is a small share of a busy window, so a "full" window-equivalent would pin it forever.
PRIOR_IDLE_ENERGY_SHARE: float = 0.1
# The scale prior decays with the data (as plain RLS forgets its initial covariance) down to this
# fraction of its initial strength: a constant full-strength prior would shrink weakly excited
# directions (a - b when the phase mix varies little) towards a = b. The floor keeps the
# covariance bounded and unexcited directions anchored. The idle prior does not decay: idle is
# weakly identified in busy windows and its prior is already weak.
PRIOR_SCALE_FLOOR: float = 0.01
# Smallest idle-watts scale used for normalisation when the prior idle power is 0 or tiny.
MIN_IDLE_SCALE_W: float = 100.0
# Robust residual scale: used until enough residuals exist, and never below the floor (a
# noise-free history would otherwise make every small genuine change an "outlier").
INITIAL_RESIDUAL_SIGMA: float = 0.3
MIN_RESIDUAL_SIGMA: float = 0.01
MIN_RESIDUALS_FOR_SCALE: int = 5
MAD_TO_SIGMA: float = 1.4826

FloatArray = npt.NDArray[np.float64]
PathLike = Union[str, "os.PathLike[str]"]


class CalibrationFileError(ValueError):
    """A calibration file exists but cannot be read as a calibration state."""


@dataclass
class CalibrationState:
    """Everything an :class:`OnlineCalibrator` needs to resume exactly; JSON-serialisable.

    ``covariance`` is the RLS "P" matrix (inverse information, physical units: scales are
    dimensionless, idle in watts). Multiply by the residual variance (relative, squared) for the
    parameter covariance.
    """

    coefficients: list[float]  # [prefill_scale, decode_scale, idle_watts]
    covariance: list[list[float]]
    windows: int  # windows learned (accepted)
    forgetting: float
    version: int = STATE_VERSION
    prior_idle_watts: float = 0.0
    prior_strength: float = 0.3
    outlier_threshold: float = 5.0
    error_window: int = 50
    windows_since_reset: int = 0
    rejected_windows: int = 0
    suspect_streak: int = 0  # signed: +n = n high suspect windows in a row, -n = n low ones
    residuals: list[float] = field(default_factory=list)  # recent relative residuals
    errors_raw: list[float] = field(default_factory=list)  # APE of P+D+prior_idle·I vs M
    errors_corrected: list[float] = field(default_factory=list)  # APE, one step ahead
    # The current suspect streak, replayed if it turns out to be a regime change:
    # [P, D, I, M, ape_raw, ape_corr, rejected (1.0) or learnt (0.0)].
    pending: list[list[float]] = field(default_factory=list)
    # The fitted model's terms calibrated offline for this deployment (``llmco2 calibrate``;
    # ``term_calibration.TermCalibration``), kept beside the online state so that saving it keeps them.
    terms: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False, indent=1)

    @classmethod
    def from_dict(cls, data: Any) -> "CalibrationState":
        """Validate a decoded JSON object; raises ValueError with the reason."""
        if not isinstance(data, dict):
            raise ValueError("top level is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        try:
            state = cls(**data)
        except TypeError as exc:  # missing required keys
            raise ValueError(str(exc)) from None
        coefficients = _finite_array(state.coefficients, (3,), "coefficients")
        covariance = _finite_array(state.covariance, (3, 3), "covariance")
        if not np.allclose(covariance, covariance.T) or np.linalg.eigvalsh(covariance).min() <= 0:
            raise ValueError("covariance is not symmetric positive definite")
        if not (0.0 < float(state.forgetting) <= 1.0):
            raise ValueError(f"forgetting {state.forgetting!r} not in (0, 1]")
        for name in ("windows", "windows_since_reset", "rejected_windows", "error_window"):
            value = getattr(state, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} {value!r} is not a non-negative integer")
        for name in ("residuals", "errors_raw", "errors_corrected"):
            _finite_array(getattr(state, name), None, name)
        if state.pending:
            _finite_array(state.pending, (len(state.pending), 7), "pending")
        if state.terms is not None and not isinstance(state.terms, dict):
            raise ValueError("terms is not a JSON object")
        state.coefficients = [float(v) for v in coefficients]
        state.covariance = covariance.tolist()
        return state


class OnlineCalibrator:
    """Recursive least squares with forgetting factor, robust to outliers, in the form
    measured ≈ a·P + b·D + c·I.

    Args:
        forgetting: RLS forgetting factor λ in (0, 1]; the fit remembers about 1/(1-λ) windows
            (0.98 → ~50). 1.0 is ordinary (robust) least squares.
        prior_idle_watts: Idle power the GPUs of the window draw together (e.g. 8 × 70 W); the
            idle coefficient starts here and is regularised towards it.
        prior_strength: Weight of the prior (a=b=1, c=prior idle) in window-equivalents.
        outlier_threshold: Reject windows whose standardised residual exceeds this many robust
            sigmas (after ``MIN_WINDOWS_BEFORE_REJECTING`` windows).
        error_window: How many recent windows :meth:`rolling_error` averages.
    """

    def __init__(
        self,
        forgetting: float = 0.98,
        prior_idle_watts: float = 0.0,
        prior_strength: float = 0.3,
        outlier_threshold: float = 5.0,
        error_window: int = 50,
    ) -> None:
        if not (0.0 < forgetting <= 1.0):
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if not (math.isfinite(prior_idle_watts) and prior_idle_watts >= 0.0):
            raise ValueError(f"prior_idle_watts must be >= 0, got {prior_idle_watts}")
        if not (math.isfinite(prior_strength) and prior_strength > 0.0):
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        if not (outlier_threshold > 0.0):
            raise ValueError(f"outlier_threshold must be > 0, got {outlier_threshold}")
        if error_window < 1:
            raise ValueError(f"error_window must be >= 1, got {error_window}")
        self._forgetting = float(forgetting)
        self._prior_idle_w = float(prior_idle_watts)
        self._prior_strength = float(prior_strength)
        self._outlier_threshold = float(outlier_threshold)
        self._error_window = int(error_window)
        # Watts scale of the idle coefficient: used to equilibrate the 3x3 algebra (scales are
        # ~1, idle watts ~100s) and to size the idle prior.
        self._idle_scale_w = max(self._prior_idle_w, MIN_IDLE_SCALE_W)
        self._theta0: FloatArray = np.array([1.0, 1.0, self._prior_idle_w])
        self._prior_info: FloatArray = self._prior_information()
        self._prior_floor: FloatArray = self._prior_info.copy()
        self._prior_floor[:2, :2] *= PRIOR_SCALE_FLOOR
        self._theta: FloatArray = self._theta0.copy()
        self.terms: dict | None = None  # the offline term calibration this state travels with
        self._cov: FloatArray = self._inverse(self._prior_info)
        self._windows = 0
        self._windows_since_reset = 0
        self._rejected = 0
        self._streak = 0
        self._residuals: deque[float] = deque(maxlen=self._error_window)
        self._errors_raw: deque[float] = deque(maxlen=self._error_window)
        self._errors_corrected: deque[float] = deque(maxlen=self._error_window)
        self._pending: list[list[float]] = []

    # ----------------------------------------------------------------------------------- public

    @property
    def factors(self) -> tuple[float, float, float]:
        """(prefill_scale, decode_scale, idle_watts) currently applied by :meth:`correct`."""
        a, b, c = (float(v) for v in self._theta)
        return a, b, c

    @property
    def windows(self) -> int:
        """Windows learned (accepted by :meth:`update`)."""
        return self._windows

    @property
    def rejected_windows(self) -> int:
        """Valid windows rejected as outliers (and not later confirmed as a regime change)."""
        return self._rejected

    @property
    def forgetting(self) -> float:
        return self._forgetting

    def correct(
        self, predicted_prefill_j: float, predicted_decode_j: float, idle_seconds: float = 0.0
    ) -> tuple[float, float, float]:
        """Calibrated (prefill_j, decode_j, idle_j); before any learning (P, D, prior_idle·I)."""
        a, b, c = self.factors
        return a * predicted_prefill_j, b * predicted_decode_j, c * idle_seconds

    def update(
        self,
        predicted_prefill_j: float,
        predicted_decode_j: float,
        idle_seconds: float,
        measured_j: float,
    ) -> bool:
        """Learn from one window; False if it is invalid or rejected as an outlier.

        Invalid windows (non-finite values, negative energies/idle, measured <= 0, nothing
        predicted) leave the state untouched. Outlier rejections only advance the outlier
        bookkeeping; the coefficients do not move.
        """
        window = (predicted_prefill_j, predicted_decode_j, idle_seconds, measured_j)
        if not _valid_window(*window):
            return False
        p, d, i, m = (float(v) for v in window)
        ape_raw = abs(p + d + self._prior_idle_w * i - m) / m
        ape_corrected = abs(float(self._theta @ (p, d, i)) - m) / m

        x, y = self._normalise(p, d, i, m)
        residual = y - float(x @ self._theta)
        sigma = self._robust_sigma()
        spread = math.sqrt(1.0 + float(x @ self._cov @ x))
        standardised = residual / (sigma * spread)
        self._residuals.append(residual)

        reject = (
            self._windows_since_reset >= MIN_WINDOWS_BEFORE_REJECTING
            and abs(standardised) > self._outlier_threshold
        )
        if abs(standardised) > SUSPECT_SIGMAS:
            self._track_suspect(residual, [p, d, i, m, ape_raw, ape_corrected, float(reject)])
            if abs(self._streak) >= REGIME_CHANGE_WINDOWS:
                self._regime_change()
                return True
        else:
            self._streak = 0
            self._pending.clear()
        if reject:
            self._rejected += 1
            return False
        weight = 1.0 if abs(standardised) <= HUBER_K else HUBER_K / abs(standardised)
        self._learn(x, y, weight)
        self._windows += 1
        self._windows_since_reset += 1
        self._errors_raw.append(ape_raw)
        self._errors_corrected.append(ape_corrected)
        return True

    def rolling_error(self) -> tuple[float, float]:
        """(raw, corrected) mean absolute percentage error over the last ``error_window``
        learned windows, as fractions (0.05 = 5%); NaN if none.

        The corrected error uses the coefficients *before* each window's update (honest
        one-step-ahead error). Windows rejected as glitches are left out: their measurement, not
        the model, is wrong; windows that confirmed a regime change are counted.
        """
        if not self._errors_corrected:
            return math.nan, math.nan
        return float(np.mean(self._errors_raw)), float(np.mean(self._errors_corrected))

    def state(self) -> CalibrationState:
        return CalibrationState(
            coefficients=[float(v) for v in self._theta],
            covariance=self._cov.tolist(),
            windows=self._windows,
            forgetting=self._forgetting,
            prior_idle_watts=self._prior_idle_w,
            prior_strength=self._prior_strength,
            outlier_threshold=self._outlier_threshold,
            error_window=self._error_window,
            windows_since_reset=self._windows_since_reset,
            rejected_windows=self._rejected,
            suspect_streak=self._streak,
            residuals=list(self._residuals),
            errors_raw=list(self._errors_raw),
            errors_corrected=list(self._errors_corrected),
            pending=[list(row) for row in self._pending],
            terms=self.terms,
        )

    @classmethod
    def from_state(cls, state: CalibrationState) -> "OnlineCalibrator":
        calibrator = cls(
            forgetting=state.forgetting,
            prior_idle_watts=state.prior_idle_watts,
            prior_strength=state.prior_strength,
            outlier_threshold=state.outlier_threshold,
            error_window=state.error_window,
        )
        calibrator._theta = np.array(state.coefficients, dtype=np.float64)
        calibrator._cov = np.array(state.covariance, dtype=np.float64)
        calibrator._windows = state.windows
        calibrator._windows_since_reset = state.windows_since_reset
        calibrator._rejected = state.rejected_windows
        calibrator._streak = state.suspect_streak
        calibrator._residuals.extend(state.residuals)
        calibrator._errors_raw.extend(state.errors_raw)
        calibrator._errors_corrected.extend(state.errors_corrected)
        calibrator._pending = [list(row) for row in state.pending]
        calibrator.terms = state.terms
        return calibrator

    def save(self, path: PathLike) -> None:
        """Write the state as JSON atomically (temp file in the same folder + os.replace), so a
        crash mid-write never leaves a truncated file for the next start to choke on."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = self.state().to_json()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: PathLike, **defaults: Any) -> "OnlineCalibrator":
        """Restore a saved calibrator; a missing file gives a fresh one built with ``defaults``.

        Raises:
            CalibrationFileError: the file exists but is not a valid calibration state.
        """
        target = Path(path)
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(**defaults)
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationFileError(f"cannot read calibration file {target}: {exc}") from exc
        try:
            data = json.loads(text)
            state = CalibrationState.from_dict(data)
            return cls.from_state(state)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise CalibrationFileError(
                f"calibration file {target} is corrupt ({exc}); delete it to start afresh"
            ) from exc

    # ---------------------------------------------------------------------------------- private

    def _prior_information(self) -> FloatArray:
        """R0 = strength · Σ0⁻¹, in the relative (per-window) units of the normalised rows."""
        rho = PRIOR_SCALE_CORRELATION
        idle_info = (PRIOR_IDLE_ENERGY_SHARE / self._idle_scale_w) ** 2
        scales = np.array([[1.0, -rho], [-rho, 1.0]]) / (1.0 - rho * rho)
        info = np.zeros((3, 3))
        info[:2, :2] = scales
        info[2, 2] = idle_info
        return self._prior_strength * info

    def _normalise(self, p: float, d: float, i: float, m: float) -> tuple[FloatArray, float]:
        """Divide the window's equation by its calibrated total, so rows are relative errors."""
        raw = np.array([p, d, i])
        scale = float(self._theta @ raw)
        if not scale > 0.0:  # zero idle watts and an all-idle window
            scale = p + d + self._idle_scale_w * i
        return raw / scale, m / scale

    def _robust_sigma(self) -> float:
        if len(self._residuals) < MIN_RESIDUALS_FOR_SCALE:
            return INITIAL_RESIDUAL_SIGMA
        residuals = np.fromiter(self._residuals, dtype=np.float64)
        mad = float(np.median(np.abs(residuals - np.median(residuals))))
        return max(MAD_TO_SIGMA * mad, MIN_RESIDUAL_SIGMA)

    def _learn(self, x: FloatArray, y: float, weight: float) -> None:
        """One regularised RLS step (information form; see module docstring).

        R ← λR + (1-λ)F + w·x·xᵀ and θ ← θ + R⁻¹[(1-λ)F(θ0-θ) + w·x·(y - xᵀθ)], with F the prior
        floor: the exact minimiser of the exponentially weighted least squares plus a prior that
        starts at R0 and decays towards F (so R >= F always: bounded covariance).
        """
        lam = self._forgetting
        info = lam * self._inverse(self._cov) + (1.0 - lam) * self._prior_floor
        info += weight * np.outer(x, x)
        info = 0.5 * (info + info.T)  # keep it exactly symmetric against rounding drift
        cov = self._inverse(info)
        residual = y - float(x @ self._theta)
        pull = (1.0 - lam) * (self._prior_floor @ (self._theta0 - self._theta))
        theta = self._theta + cov @ (pull + weight * residual * x)
        self._theta = self._clip(theta)
        self._cov = cov

    def _track_suspect(self, residual: float, window: list[float]) -> None:
        sign = 1 if residual > 0 else -1
        if self._streak * sign <= 0:  # a new streak: the held windows were isolated glitches
            self._streak = 0
            self._pending.clear()
        self._streak += sign
        self._pending.append(window)

    def _regime_change(self) -> None:
        """Forget the data (back to prior information, centred on the current estimate) and
        replay the streak at full weight, so the new regime is learnt at once instead of being
        rejected, or down-weighted, window after window."""
        held, self._pending = self._pending, []
        self._streak = 0
        self._cov = self._inverse(self._prior_info)
        self._windows_since_reset = 0
        self._residuals.clear()  # residuals of the old regime say nothing about the new noise
        for index, (p, d, i, m, ape_raw, ape_corrected, rejected) in enumerate(held):
            x, y = self._normalise(p, d, i, m)
            self._residuals.append(y - float(x @ self._theta))
            self._learn(x, y, 1.0)
            self._windows_since_reset += 1
            current = index == len(held) - 1  # this update's window: not yet counted anywhere
            if rejected and not current:
                self._rejected -= 1
            if rejected or current:  # earlier learnt windows are already counted
                self._windows += 1
                self._errors_raw.append(ape_raw)
                self._errors_corrected.append(ape_corrected)

    def _inverse(self, matrix: FloatArray) -> FloatArray:
        """Inverse of a 3x3 SPD matrix, equilibrated: scales are ~1 but idle watts are ~100s,
        so the raw matrix is badly scaled even when the problem is not."""
        diag = np.array([1.0, 1.0, self._idle_scale_w])
        scaled = matrix * np.outer(diag, diag)
        inverse = np.linalg.inv(scaled) * np.outer(diag, diag)
        return 0.5 * (inverse + inverse.T)

    @staticmethod
    def _clip(theta: FloatArray) -> FloatArray:
        return np.array(
            [
                min(max(theta[0], SCALE_MIN), SCALE_MAX),
                min(max(theta[1], SCALE_MIN), SCALE_MAX),
                max(theta[2], 0.0),
            ]
        )


def fit_offline(
    rows: Iterable[Sequence[float]], **kwargs: Any
) -> OnlineCalibrator:
    """Fit a calibrator on a measurement table of (P, D, I, M) rows with the online code.

    ``forgetting`` defaults to 1.0 here (ordinary robust least squares over the whole table);
    other keyword arguments go to :class:`OnlineCalibrator`.
    """
    kwargs.setdefault("forgetting", 1.0)
    calibrator = OnlineCalibrator(**kwargs)
    for row in rows:
        p, d, i, m = row
        calibrator.update(p, d, i, m)
    return calibrator


def _valid_window(p: float, d: float, i: float, m: float) -> bool:
    try:
        values = [float(v) for v in (p, d, i, m)]
    except (TypeError, ValueError):
        return False
    if not all(math.isfinite(v) for v in values):
        return False
    p, d, i, m = values
    # Measured must be positive: percentage errors divide by it, and 0 J from NVML is a glitch.
    return p >= 0.0 and d >= 0.0 and i >= 0.0 and m > 0.0 and (p + d + i) > 0.0


def _finite_array(value: Any, shape: tuple[int, ...] | None, name: str) -> FloatArray:
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not numeric") from None
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if shape is None and array.ndim != 1:
        raise ValueError(f"{name} is not a flat list")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    return array
