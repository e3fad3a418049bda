"""Per-request results shared by the engine and the API servers: forecasts, actuals, budget spend.

vLLM runs the engine (where energy is attributed) and the API servers (where requests arrive and
clients ask for their results) in different processes, possibly several API servers. They share one
SQLite database in the plugin's run directory (WAL mode: readers never wait for the writer):

- an API server writes a request's **forecast** when it admits it (``record_forecast``);
- the plugin's worker adds each finished engine request's **actual** (``record_actuals``,
  batched); a client request with ``n > 1`` or several prompts is several engine requests, summed
  under the id the client sees (``FinishedRequest.client_request_id``);
- the engine publishes its current state (running requests, calibration factors) for forecasts
  (``publish_engine_state``);
- admission control reads the carbon spent in its window (``spent_grams``).

Rows older than the retention are deleted by the engine. Every call is short; callers on an event
loop run them in a thread.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from llmco2_vllm.predict.forecast import ForecastOutcome
from llmco2_vllm.serve.request_record import FinishedRequest

DATABASE_NAME = "requests.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,      -- the id the client sees ("cmpl-...", "chatcmpl-...")
    time REAL NOT NULL,               -- admitted (or first finished) at, unix seconds
    forecast TEXT,                    -- JSON of the forecast, NULL when the request was not forecast
    forecast_grams REAL,
    expected_parts INTEGER,           -- engine requests the client request fans out to (prompts x n)
    finished_parts INTEGER NOT NULL DEFAULT 0,
    finished_at REAL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    decode_tokens INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    prefill_energy_j REAL NOT NULL DEFAULT 0,
    decode_energy_j REAL NOT NULL DEFAULT 0,
    calibrated_energy_j REAL NOT NULL DEFAULT 0,
    operational_grams REAL NOT NULL DEFAULT 0,
    embodied_grams REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
CREATE TABLE IF NOT EXISTS engine_state (
    engine TEXT PRIMARY KEY,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL
);
"""

class RequestResultStore:
    """The shared database; one instance per process, safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        with self._connect() as connection:
            connection.executescript(_SCHEMA)

    @classmethod
    def in_directory(cls, directory: str | Path) -> "RequestResultStore":
        return cls(Path(directory) / DATABASE_NAME)

    def _connect(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # results are re-derivable; no fsync per request
            connection.row_factory = sqlite3.Row
            self._local.connection = connection
        return connection

    # -- API servers ------------------------------------------------------------------------
    def record_forecast(self, request_id: str, forecast: dict[str, Any], grams: float, parts: int, now: float | None = None) -> None:
        self._connect().execute(
            "INSERT INTO requests (request_id, time, forecast, forecast_grams, expected_parts) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(request_id) DO UPDATE SET forecast = excluded.forecast, "
            "forecast_grams = excluded.forecast_grams, expected_parts = excluded.expected_parts",
            (request_id, time.time() if now is None else now, json.dumps(forecast), grams, parts),
        )

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The forecast and the actual of a client request (by its response id), or None."""
        row = self._connect().execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        parts = row["expected_parts"]
        finished = row["finished_parts"] > 0 and (parts is None or row["finished_parts"] >= parts)
        actual = None
        if row["finished_parts"] > 0:
            energy_j = row["prefill_energy_j"] + row["decode_energy_j"]
            actual = {
                "complete": finished,
                "finished_at": row["finished_at"],
                "prompt_tokens": row["prompt_tokens"],
                "cached_tokens": row["cached_tokens"],
                # The first output token comes from the prefill step; decode steps make the rest.
                "output_tokens": row["decode_tokens"] + row["finished_parts"],
                "steps": row["steps"],
                "prefill_energy_j": row["prefill_energy_j"],
                "decode_energy_j": row["decode_energy_j"],
                "energy_j": energy_j,
                "calibrated_energy_j": row["calibrated_energy_j"],
                "operational_grams_co2e": row["operational_grams"],
                "embodied_grams_co2e": row["embodied_grams"],
                "grams_co2e": row["operational_grams"] + row["embodied_grams"],
            }
        forecast = json.loads(row["forecast"]) if row["forecast"] else None
        status = "finished" if finished else "running"
        if forecast is not None and forecast.get("admission", {}).get("decision") == "rejected":
            status = "rejected"
        return {"id": row["request_id"], "status": status, "forecast": forecast, "actual": actual}

    def spent_grams(self, since: float) -> float:
        """Carbon of the requests admitted since ``since``: actual when finished, else the larger of forecast and actual so far."""
        row = self._connect().execute(
            "SELECT SUM(CASE WHEN expected_parts IS NULL OR finished_parts >= expected_parts "
            "THEN operational_grams + embodied_grams "
            "ELSE MAX(operational_grams + embodied_grams, COALESCE(forecast_grams, 0)) END) "
            "FROM requests WHERE time >= ?",
            (since,),
        ).fetchone()
        return float(row[0] or 0.0)

    def oldest_spend_after(self, since: float) -> float | None:
        """When the oldest spend still in the window was made (for Retry-After), or None."""
        row = self._connect().execute("SELECT MIN(time) FROM requests WHERE time >= ?", (since,)).fetchone()
        return None if row[0] is None else float(row[0])

    def recent_output_tokens(self, limit: int = 1000) -> list[tuple[int, int | None]]:
        """(output tokens, max_tokens or None) of recently finished forecast requests, newest first."""
        rows = self._connect().execute(
            "SELECT decode_tokens, finished_parts, forecast FROM requests "
            "WHERE finished_parts > 0 AND forecast IS NOT NULL AND finished_parts >= expected_parts "
            "ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        result = []
        for row in rows:
            forecast = json.loads(row["forecast"])
            parts = max(int(row["finished_parts"]), 1)
            result.append(((int(row["decode_tokens"]) + parts) // parts, forecast.get("max_tokens")))
        return result

    def recent_outcomes(self, limit: int = 1000, arrived_before: float | None = None) -> list[ForecastOutcome]:
        """Finished forecast requests' forecasts beside their actuals, newest arrival first (what
        forecasts learn from); ``arrived_before``: only requests that arrived before then (unix seconds)."""
        rows = self._connect().execute(
            "SELECT forecast, finished_parts, prompt_tokens, cached_tokens, decode_tokens, calibrated_energy_j "
            "FROM requests WHERE finished_parts > 0 AND forecast IS NOT NULL AND finished_parts >= expected_parts "
            "AND time < ? ORDER BY time DESC LIMIT ?",
            (math.inf if arrived_before is None else arrived_before, limit),
        ).fetchall()
        outcomes = []
        for row in rows:
            forecast = json.loads(row["forecast"])
            parts = max(int(row["finished_parts"]), 1)
            try:
                outcomes.append(
                    ForecastOutcome(
                        max_tokens=int(forecast.get("max_tokens") or 0),
                        output_tokens=(int(row["decode_tokens"]) + parts) // parts,
                        prompt_tokens=int(row["prompt_tokens"]) // parts,
                        cached_tokens=int(row["cached_tokens"]) // parts,
                        raw_energy_j=forecast.get("raw_energy_j"),
                        energy_j=float(forecast["energy_j"]),
                        energy_j_low=float(forecast["energy_j_low"]),
                        energy_j_high=float(forecast["energy_j_high"]),
                        actual_energy_j=float(row["calibrated_energy_j"]),
                        concurrent_requests=float(forecast.get("concurrent_requests") or 0.0),
                        output_tokens_source=str(forecast.get("output_tokens_source") or ""),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue  # a row written by another version: nothing to learn from it
        return outcomes

    def engine_states(self, max_age_seconds: float = 30.0) -> list[dict[str, Any]]:
        rows = self._connect().execute(
            "SELECT state FROM engine_state WHERE updated_at >= ?", (time.time() - max_age_seconds,)
        ).fetchall()
        return [json.loads(row["state"]) for row in rows]

    # -- engine -----------------------------------------------------------------------------
    def record_actuals(self, finished: Iterable[FinishedRequest]) -> None:
        """Add finished engine requests to their client requests' actuals (one transaction)."""
        rows = [
            (
                a.client_request_id,
                a.finished_at,
                a.finished_at,
                a.prompt_tokens,
                a.cached_tokens,
                a.decode_tokens,
                a.steps,
                a.prefill_energy_j,
                a.decode_energy_j,
                a.calibrated_energy_j,
                a.operational_grams,
                a.embodied_grams,
            )
            for a in finished
        ]
        if not rows:
            return
        connection = self._connect()
        with connection:  # one transaction per batch
            connection.execute("BEGIN")
            connection.executemany(
                "INSERT INTO requests (request_id, time, finished_at, finished_parts, prompt_tokens, cached_tokens, "
                "decode_tokens, steps, prefill_energy_j, decode_energy_j, calibrated_energy_j, operational_grams, "
                "embodied_grams) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(request_id) DO UPDATE SET finished_at = excluded.finished_at, "
                "finished_parts = finished_parts + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "cached_tokens = cached_tokens + excluded.cached_tokens, "
                "decode_tokens = decode_tokens + excluded.decode_tokens, steps = steps + excluded.steps, "
                "prefill_energy_j = prefill_energy_j + excluded.prefill_energy_j, "
                "decode_energy_j = decode_energy_j + excluded.decode_energy_j, "
                "calibrated_energy_j = calibrated_energy_j + excluded.calibrated_energy_j, "
                "operational_grams = operational_grams + excluded.operational_grams, "
                "embodied_grams = embodied_grams + excluded.embodied_grams",
                rows,
            )

    def publish_engine_state(self, engine: str, state: dict[str, Any]) -> None:
        self._connect().execute(
            "INSERT INTO engine_state (engine, updated_at, state) VALUES (?, ?, ?) "
            "ON CONFLICT(engine) DO UPDATE SET updated_at = excluded.updated_at, state = excluded.state",
            (engine, time.time(), json.dumps(state)),
        )

    def delete_older_than(self, cutoff: float) -> int:
        return self._connect().execute("DELETE FROM requests WHERE time < ?", (cutoff,)).rowcount


__all__ = ["RequestResultStore", "DATABASE_NAME"]
