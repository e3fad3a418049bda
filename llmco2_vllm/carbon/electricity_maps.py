"""Live grid intensity from the Electricity Maps API v3, fetched on the provider's own daemon thread.

The value is an *average* (attributional) intensity: what the grid's mix emitted per kWh,
which answers "what did this request emit". Marginal intensity (what one more kWh would emit
now) needs another service and licence (WattTime) and is not provided.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

from llmco2_vllm.carbon.intensity import MAX_GRAMS_CO2E_PER_KWH, GridIntensity
from llmco2_vllm.carbon.static import StaticIntensity

__all__ = ["ElectricityMapsIntensity"]

logger = logging.getLogger(__name__)

_MAX_RESPONSE_BYTES = 1 << 20  # a latest-value answer is a few hundred bytes


class ElectricityMapsIntensity:
    """Live average intensity from the Electricity Maps API v3, refreshed on a daemon thread.

    ``GET {base_url}/carbon-intensity/latest?zone=ZONE`` with header ``auth-token``. The last
    good value is used while it is at most ``max_stale_seconds`` old (default three refresh
    periods); before the first success, and when the service has been failing for longer, the
    ``fallback`` value is used (``fallback_active``): a static one, which never blocks. Failures (timeout, HTTP
    errors, bad JSON, a missing or negative ``carbonIntensity``) are counted in ``errors`` and
    logged once per kind. ``timeout_seconds`` bounds each socket operation of a fetch.
    The API key is sent only in the header and never logged.
    """

    def __init__(
        self,
        base_url: str,
        zone: str,
        api_key: str,
        fallback: StaticIntensity,
        *,
        refresh_seconds: float = 300.0,
        timeout_seconds: float = 5.0,
        max_stale_seconds: float | None = None,
    ) -> None:
        if not (math.isfinite(refresh_seconds) and refresh_seconds > 0):
            raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
        if not (math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
        if not zone:
            raise ValueError("zone must be an Electricity Maps zone code such as 'FR' or 'US-CAL-CISO'")
        self.url = f"{base_url.rstrip('/')}/carbon-intensity/latest?{urllib.parse.urlencode({'zone': zone})}"
        self.zone = zone
        self._api_key = api_key
        self._fallback = fallback
        self._refresh_seconds = refresh_seconds
        self._timeout_seconds = timeout_seconds
        self._max_stale_seconds = 3.0 * refresh_seconds if max_stale_seconds is None else max_stale_seconds
        self._lock = threading.Lock()
        self._last: GridIntensity | None = None
        self._last_obtained_monotonic = time.monotonic()
        self._emission_factor_type: str | None = None
        self._errors = 0
        self._successes = 0
        self._logged_kinds: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmco2-grid-intensity", daemon=True)
        self._thread.start()

    def current(self) -> GridIntensity:
        with self._lock:
            last, obtained = self._last, self._last_obtained_monotonic
        if last is not None and time.monotonic() - obtained <= self._max_stale_seconds:
            return last
        return self._fallback.current()

    @property
    def fallback_active(self) -> bool:
        with self._lock:
            last, obtained = self._last, self._last_obtained_monotonic
        return last is None or time.monotonic() - obtained > self._max_stale_seconds

    @property
    def age_seconds(self) -> float:
        """Seconds since the live service last answered (since start before it ever did).

        It keeps growing while the fallback is in use, so an alert on it sees the outage.
        """
        with self._lock:
            return time.monotonic() - self._last_obtained_monotonic

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    @property
    def successes(self) -> int:
        """Good fetches so far (tests and diagnostics)."""
        with self._lock:
            return self._successes

    @property
    def emission_factor_type(self) -> str | None:
        """``"lifecycle"`` or ``"direct"`` as the service reported it; ``None`` before a success."""
        with self._lock:
            return self._emission_factor_type

    @property
    def thread_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        # A fetch in flight finishes within its socket timeout.
        self._thread.join(timeout=self._timeout_seconds + 1.0)
        self._fallback.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._fetch_once()
            except Exception as error:  # never let the refresh thread die
                self._record_error("unexpected", f"unexpected error {error!r}")
            self._stop.wait(self._refresh_seconds)

    def _fetch_once(self) -> None:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json", "User-Agent": "llmco2-vllm"})
        if self._api_key:
            # Unredirected: a redirect to another host must not carry the key.
            request.add_unredirected_header("auth-token", self._api_key)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_seconds) as response:
                body = response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as error:
            error.close()
            self._record_error(f"http_{error.code}", _http_error_message(error.code))
            return
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                self._record_error("timeout", f"no answer within {self._timeout_seconds} s")
            else:
                self._record_error("connection", f"cannot connect: {error.reason}")
            return
        except TimeoutError:
            self._record_error("timeout", f"no answer within {self._timeout_seconds} s")
            return
        except OSError as error:
            self._record_error("connection", f"connection failed: {error!r}")
            return
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self._record_error("bad_json", "the answer is not JSON")
            return
        raw = payload.get("carbonIntensity") if isinstance(payload, dict) else None
        if raw is None:
            self._record_error("missing_field", "the answer has no carbonIntensity")
            return
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not (
            math.isfinite(raw) and 0.0 <= raw <= MAX_GRAMS_CO2E_PER_KWH
        ):
            self._record_error("bad_value", f"carbonIntensity {raw!r} is not a number between 0 and {MAX_GRAMS_CO2E_PER_KWH:g}")
            return
        intensity = GridIntensity(
            grams_co2e_per_kwh=float(raw),
            region=self.zone,
            kind="average",
            year=_year_of(payload.get("datetime")),
            source=self.url,
        )
        factor_type = payload.get("emissionFactorType")
        with self._lock:
            self._last = intensity
            self._last_obtained_monotonic = time.monotonic()
            self._emission_factor_type = factor_type if isinstance(factor_type, str) else "lifecycle"
            self._successes += 1
            first = self._successes == 1
        if first:
            logger.info(
                "llmco2: live grid intensity for %s: %.1f gCO2e/kWh (%s) from %s",
                self.zone, intensity.grams_co2e_per_kwh, self._emission_factor_type, self.url,
            )

    def _record_error(self, kind: str, detail: str) -> None:
        with self._lock:
            self._errors += 1
            if kind in self._logged_kinds:
                return
            self._logged_kinds.add(kind)
        logger.warning(
            "llmco2: grid intensity from %s failed: %s; using %s (counted; logged once per kind)",
            self.url, detail, "the last good value while fresh, else the fallback",
        )


def _http_error_message(code: int) -> str:
    if code in (401, 403):
        return (
            f"HTTP {code}: the API key was refused; check LLMCO2_GRID_INTENSITY_API_KEY "
            "(sent as the auth-token header) and that it covers this zone"
        )
    if code == 429:
        return "HTTP 429: rate limited; raise LLMCO2_GRID_INTENSITY_REFRESH_SECONDS"
    return f"HTTP {code}"


def _year_of(raw: Any) -> int | None:
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).year
    except ValueError:
        return None
