"""Settings: defaults, env and TOML sources with their precedence, and errors that say the fix.

Every test passes its own ``environ`` mapping: the process environment is never read or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmco2_vllm.settings import (
    TABLE_END,
    TABLE_START,
    Settings,
    SettingsError,
    main,
    setting_declarations,
    settings_table_markdown,
    with_settings_table,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_validate() -> None:
    settings = Settings.from_env(environ={})
    assert settings == Settings()
    assert settings.enabled is True
    assert settings.pue == 1.0
    assert settings.region == "WORLD"
    assert settings.grid_intensity is None
    assert settings.predictor == "fitted"
    Settings().validate()  # no exception


def test_env_overrides() -> None:
    settings = Settings.from_env(
        environ={
            "LLMCO2_PUE": "1.3",
            "LLMCO2_REGION": "DE",
            "LLMCO2_QUEUE_CAPACITY": "64",
            "LLMCO2_GRID_INTENSITY": "123.5",
            "LLMCO2_TARGET_GPU": "NVIDIA H100 80GB HBM3",
            "PATH": "/usr/bin",  # non-LLMCO2 variables are ignored
        }
    )
    assert settings.pue == 1.3
    assert settings.region == "DE"
    assert settings.queue_capacity == 64
    assert settings.grid_intensity == 123.5
    assert settings.target_gpu == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), ("off", False), ("TRUE", True), ("yes", True)])
def test_enabled_parses_booleans(raw: str, expected: bool) -> None:
    assert Settings.from_env(environ={"LLMCO2_ENABLED": raw}).enabled is expected


def test_enabled_rejects_non_boolean() -> None:
    with pytest.raises(SettingsError, match=r"LLMCO2_ENABLED='maybe': expected true or false"):
        Settings.from_env(environ={"LLMCO2_ENABLED": "maybe"})


def test_toml_file_and_env_precedence(tmp_path: Path) -> None:
    config = tmp_path / "llmco2.toml"
    config.write_text('[llmco2]\npue = 1.5\nregion = "FR"\nenabled = false\nmax_tracked_requests = 500\n')
    from_file = Settings.from_env(environ={"LLMCO2_CONFIG": str(config)})
    assert (from_file.pue, from_file.region, from_file.enabled, from_file.max_tracked_requests) == (1.5, "FR", False, 500)
    # The environment wins over the file, key by key; the rest still comes from the file.
    both = Settings.from_env(environ={"LLMCO2_CONFIG": str(config), "LLMCO2_PUE": "1.3"})
    assert both.pue == 1.3
    assert both.region == "FR" and both.enabled is False


def test_toml_file_without_table(tmp_path: Path) -> None:
    config = tmp_path / "flat.toml"
    config.write_text("pue = 1.2\ngrid_intensity = 50\n")
    settings = Settings.from_env(environ={"LLMCO2_CONFIG": str(config)})
    assert settings.pue == 1.2 and settings.grid_intensity == 50.0


def test_unknown_gpu_points_to_the_list() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_TARGET_GPU": "H1000X"})
    message = str(info.value)
    assert "LLMCO2_TARGET_GPU" in message and "H1000X" in message
    assert "`llmco2 gpus`" in message


def test_unknown_region_says_how_to_fix() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_REGION": "Atlantis"})
    message = str(info.value)
    assert "LLMCO2_REGION" in message and "Atlantis" in message
    assert "llmco2 regions" in message and "LLMCO2_GRID_INTENSITY" in message


def test_explicit_grid_intensity_skips_region_lookup_and_is_range_checked() -> None:
    settings = Settings.from_env(environ={"LLMCO2_REGION": "Atlantis", "LLMCO2_GRID_INTENSITY": "300"})
    assert settings.grid_intensity == 300.0
    with pytest.raises(SettingsError, match="LLMCO2_GRID_INTENSITY=-1.0"):
        Settings.from_env(environ={"LLMCO2_GRID_INTENSITY": "-1"})


@pytest.mark.parametrize("value", ["0.9", "nan", "6"])
def test_pue_out_of_range(value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_PUE": value})
    message = str(info.value)
    assert message.startswith("LLMCO2_PUE=")
    assert ">= 1.0" in message  # the fix: a ratio of at least 1


def test_pue_not_a_number() -> None:
    with pytest.raises(SettingsError, match=r"LLMCO2_PUE='one point two': expected a number"):
        Settings.from_env(environ={"LLMCO2_PUE": "one point two"})


def test_int_setting_not_a_whole_number() -> None:
    with pytest.raises(SettingsError, match=r"LLMCO2_QUEUE_CAPACITY='lots': expected a whole number"):
        Settings.from_env(environ={"LLMCO2_QUEUE_CAPACITY": "lots"})


def test_misspelt_variable_suggests_the_right_one() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_REGON": "FR"})
    message = str(info.value)
    assert "LLMCO2_REGON" in message
    assert "Did you mean LLMCO2_REGION?" in message


def test_misspelt_key_in_file_suggests_the_right_one(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[llmco2]\npeu = 1.2\n")
    with pytest.raises(SettingsError, match=r"'peu'.*Did you mean pue\?"):
        Settings.from_env(environ={"LLMCO2_CONFIG": str(config)})


def test_bad_toml(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[llmco2\npue = \n")
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_CONFIG": str(config)})
    message = str(info.value)
    assert "LLMCO2_CONFIG" in message and str(config) in message and "not valid TOML" in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_CONFIG": str(missing)})
    message = str(info.value)
    assert "no such file" in message and str(missing) in message and "unset" in message


def test_request_log_in_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "requests.jsonl"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_REQUEST_LOG": str(target)})
    message = str(info.value)
    assert "LLMCO2_REQUEST_LOG" in message and "not writable" in message
    assert str(target.parent) in message


def test_request_log_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SettingsError, match="LLMCO2_REQUEST_LOG"):
        Settings.from_env(environ={"LLMCO2_REQUEST_LOG": str(blocker / "requests.jsonl")})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_request_log_in_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SettingsError, match="not writable"):
            Settings.from_env(environ={"LLMCO2_REQUEST_LOG": str(locked / "requests.jsonl")})
    finally:
        locked.chmod(0o700)


def test_request_log_in_writable_directory(tmp_path: Path) -> None:
    target = tmp_path / "requests.jsonl"
    assert Settings.from_env(environ={"LLMCO2_REQUEST_LOG": str(target)}).request_log == str(target)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("LLMCO2_QUEUE_CAPACITY", "4", "at least 16"),
        ("LLMCO2_FLUSH_INTERVAL_SECONDS", "0", "0.05 to 60"),
        ("LLMCO2_MAX_TRACKED_REQUESTS", "10", "at least 100"),
        ("LLMCO2_PREDICTOR", "learned", "package.module:Class"),
    ],
)
def test_other_limits(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={variable: value})
    assert variable in str(info.value) and fragment in str(info.value)


def test_internal_variables_are_not_settings(tmp_path: Path) -> None:
    # LLMCO2_RUN_DIR is plumbing: it must not be rejected as an unknown setting.
    assert Settings.from_env(environ={"LLMCO2_RUN_DIR": str(tmp_path)}) == Settings()


def test_new_defaults() -> None:
    settings = Settings.from_env(environ={})
    assert (settings.grid_intensity_file, settings.grid_intensity_url, settings.grid_intensity_zone) == ("", "", "")
    assert settings.grid_intensity_refresh_seconds == 300.0 and settings.grid_intensity_timeout_seconds == 5.0
    assert settings.embodied_kg_per_gpu is None and settings.hardware_lifetime_years == 4.0
    assert (settings.admission_max_request_grams, settings.admission_budget_grams) == (0.0, 0.0)
    assert settings.admission_budget_window_seconds == 3600.0
    assert (settings.admission_defer_above_intensity, settings.admission_max_defer_seconds) == (0.0, 600.0)
    assert settings.admission_fail_closed is False
    assert settings.request_results_retention_seconds == 3600.0


def test_new_settings_from_env_and_file(tmp_path: Path) -> None:
    series = tmp_path / "series.csv"
    series.write_text("timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,120\n")
    config = tmp_path / "llmco2.toml"
    config.write_text(
        "[llmco2]\nembodied_kg_per_gpu = 318\nadmission_fail_closed = true\nadmission_budget_grams = 500\n"
        f'grid_intensity_file = "{series}"\n'
    )
    settings = Settings.from_env(
        environ={
            "LLMCO2_CONFIG": str(config),
            "LLMCO2_GRID_INTENSITY_URL": "https://api.electricitymaps.com/v3",
            "LLMCO2_GRID_INTENSITY_ZONE": "DE",
            "LLMCO2_GRID_INTENSITY_API_KEY": "secret-key",
            "LLMCO2_GRID_INTENSITY_REFRESH_SECONDS": "600",
            "LLMCO2_HARDWARE_LIFETIME_YEARS": "5",
            "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "400",
            "LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS": "120",
        }
    )
    assert settings.grid_intensity_file == str(series)
    assert settings.embodied_kg_per_gpu == 318.0 and settings.admission_fail_closed is True
    assert settings.admission_budget_grams == 500.0 and settings.grid_intensity_refresh_seconds == 600.0
    assert settings.admission_defer_above_intensity == 400.0 and settings.request_results_retention_seconds == 120.0
    assert "secret-key" not in repr(settings)


def test_embodied_from_settings() -> None:
    default = Settings().embodied()
    assert (default.kg_co2e_per_gpu, default.lifetime_years) == (463.0, 4.0)
    assert default.source.startswith("https://")
    longer = Settings.from_env(environ={"LLMCO2_HARDWARE_LIFETIME_YEARS": "6"}).embodied()
    assert (longer.kg_co2e_per_gpu, longer.lifetime_years, longer.source) == (463.0, 6.0, default.source)
    user = Settings.from_env(environ={"LLMCO2_EMBODIED_KG_PER_GPU": "318", "LLMCO2_HARDWARE_LIFETIME_YEARS": "3"}).embodied()
    assert (user.kg_co2e_per_gpu, user.lifetime_years, user.source) == (318.0, 3.0, "user setting")
    off = Settings.from_env(environ={"LLMCO2_EMBODIED_KG_PER_GPU": "0"}).embodied()
    assert off.grams_per_gpu_second == 0.0


@pytest.mark.parametrize(
    ("environ", "variable", "fix"),
    [
        ({"LLMCO2_GRID_INTENSITY_URL": "ftp://example.org/v3"}, "LLMCO2_GRID_INTENSITY_URL", "https://api.electricitymaps.com/v3"),
        ({"LLMCO2_GRID_INTENSITY_URL": "api.electricitymaps.com/v3"}, "LLMCO2_GRID_INTENSITY_URL", "http(s)"),
        ({"LLMCO2_GRID_INTENSITY_URL": "https://api.electricitymaps.com/v3"}, "LLMCO2_GRID_INTENSITY_ZONE", "'WORLD'"),
        ({"LLMCO2_GRID_INTENSITY_API_KEY": "k"}, "LLMCO2_GRID_INTENSITY_API_KEY", "LLMCO2_GRID_INTENSITY_URL"),
        ({"LLMCO2_GRID_INTENSITY_ZONE": "DE"}, "LLMCO2_GRID_INTENSITY_ZONE", "LLMCO2_GRID_INTENSITY_URL"),
        ({"LLMCO2_GRID_INTENSITY_REFRESH_SECONDS": "5"}, "LLMCO2_GRID_INTENSITY_REFRESH_SECONDS", "10 to 86400"),
        ({"LLMCO2_GRID_INTENSITY_REFRESH_SECONDS": "nan"}, "LLMCO2_GRID_INTENSITY_REFRESH_SECONDS", "10 to 86400"),
        ({"LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS": "0.01"}, "LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS", "0.1 to 60"),
        ({"LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS": "120"}, "LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS", "0.1 to 60"),
        ({"LLMCO2_EMBODIED_KG_PER_GPU": "-1"}, "LLMCO2_EMBODIED_KG_PER_GPU", "0 switches embodied carbon off"),
        ({"LLMCO2_EMBODIED_KG_PER_GPU": "50000"}, "LLMCO2_EMBODIED_KG_PER_GPU", "0 to 10000"),
        ({"LLMCO2_EMBODIED_KG_PER_GPU": "inf"}, "LLMCO2_EMBODIED_KG_PER_GPU", "0 to 10000"),
        ({"LLMCO2_HARDWARE_LIFETIME_YEARS": "0.1"}, "LLMCO2_HARDWARE_LIFETIME_YEARS", "0.5 to 15"),
        ({"LLMCO2_HARDWARE_LIFETIME_YEARS": "20"}, "LLMCO2_HARDWARE_LIFETIME_YEARS", "0.5 to 15"),
        ({"LLMCO2_ADMISSION_MAX_REQUEST_GRAMS": "-0.5"}, "LLMCO2_ADMISSION_MAX_REQUEST_GRAMS", "0 switches it off"),
        ({"LLMCO2_ADMISSION_MAX_REQUEST_GRAMS": "nan"}, "LLMCO2_ADMISSION_MAX_REQUEST_GRAMS", ">= 0"),
        ({"LLMCO2_ADMISSION_BUDGET_GRAMS": "-1"}, "LLMCO2_ADMISSION_BUDGET_GRAMS", "0 switches it off"),
        ({"LLMCO2_ADMISSION_BUDGET_GRAMS": "inf"}, "LLMCO2_ADMISSION_BUDGET_GRAMS", ">= 0"),
        ({"LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS": "0.5"}, "LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS", "1 to 2592000"),
        ({"LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS": "3000000"}, "LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS", "1 to 2592000"),
        ({"LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "-10"}, "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY", "0 and 5000"),
        ({"LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "9000"}, "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY", "0 and 5000"),
        ({"LLMCO2_ADMISSION_MAX_DEFER_SECONDS": "-1"}, "LLMCO2_ADMISSION_MAX_DEFER_SECONDS", "0 to 86400"),
        ({"LLMCO2_ADMISSION_MAX_DEFER_SECONDS": "100000"}, "LLMCO2_ADMISSION_MAX_DEFER_SECONDS", "0 to 86400"),
        ({"LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS": "30"}, "LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS", "60 to 604800"),
        ({"LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS": "700000"}, "LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS", "60 to 604800"),
    ],
)
def test_new_settings_validation(environ: dict[str, str], variable: str, fix: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ=environ)
    message = str(info.value)
    assert variable in message and fix in message


def test_boundaries_are_accepted() -> None:
    Settings.from_env(environ={
        "LLMCO2_GRID_INTENSITY_REFRESH_SECONDS": "10", "LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS": "60",
        "LLMCO2_EMBODIED_KG_PER_GPU": "0", "LLMCO2_HARDWARE_LIFETIME_YEARS": "15",
        "LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS": "2592000", "LLMCO2_ADMISSION_MAX_DEFER_SECONDS": "0",
        "LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS": "60", "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "5000",
    })


def test_admission_fail_closed_must_be_boolean() -> None:
    with pytest.raises(SettingsError, match=r"LLMCO2_ADMISSION_FAIL_CLOSED='sometimes': expected true or false"):
        Settings.from_env(environ={"LLMCO2_ADMISSION_FAIL_CLOSED": "sometimes"})


def test_live_url_with_zone_or_country_region_is_accepted() -> None:
    url = "http://127.0.0.1:9/v3"
    assert Settings.from_env(environ={"LLMCO2_GRID_INTENSITY_URL": url, "LLMCO2_GRID_INTENSITY_ZONE": "US-CAL-CISO"}).grid_intensity_zone == "US-CAL-CISO"
    assert Settings.from_env(environ={"LLMCO2_GRID_INTENSITY_URL": url, "LLMCO2_REGION": "DE"}).grid_intensity_url == url


def test_api_key_never_in_error_messages() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_GRID_INTENSITY_API_KEY": "secret-key-123"})
    assert "secret-key-123" not in str(info.value)


def test_files_named_by_settings_are_not_read(tmp_path: Path) -> None:
    # Settings check values; the grid-intensity file is checked where its provider is built
    # (carbon.providers.check_intensity_sources, tests/test_grid_intensity.py) and the calibration
    # file where it is loaded (OnlineCalibrator.load, tests/test_calibration.py).
    corrupt = tmp_path / "calibration.json"
    corrupt.write_text("{not json")
    settings = Settings.from_env(environ={
        "LLMCO2_GRID_INTENSITY_FILE": str(tmp_path / "absent.csv"),
        "LLMCO2_CALIBRATION_FILE": str(corrupt),
    })
    assert settings.grid_intensity_file == str(tmp_path / "absent.csv")
    assert settings.calibration_file == str(corrupt)


def test_calibration_file_in_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "calibration.json"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_CALIBRATION_FILE": str(target)})
    message = str(info.value)
    assert "LLMCO2_CALIBRATION_FILE" in message and "not writable" in message and str(target.parent) in message


# --- declarations: validation and the README table are generated from them ------------------------------


def test_every_field_is_declared_once_with_its_meaning() -> None:
    declarations = setting_declarations()
    assert [d.name for d in declarations] == [f for f in Settings.__dataclass_fields__]
    for declaration in declarations:
        assert declaration.doc_text.strip(), declaration.name
        assert declaration.default == getattr(Settings(), declaration.name)
        if declaration.value_type in (int, float):
            assert declaration.minimum is not None and declaration.fix, declaration.name  # NaN/inf need a fix too
        if declaration.choices:
            assert declaration.default in declaration.choices and declaration.fix


def test_fixes_name_the_declared_bounds() -> None:
    # A fix written out by hand must not drift from the range that is enforced.
    def written(bound: float) -> set[str]:  # 1.0 may read "1" or "1.0"; 2592000.0 reads "2592000"
        return {repr(float(bound)), str(int(bound)) if float(bound).is_integer() else repr(float(bound))}

    for declaration in setting_declarations():
        for bound in (declaration.minimum, declaration.maximum):
            if bound is not None:
                assert any(text in declaration.fix_text for text in written(bound)), (declaration.name, bound)


def test_generated_range_checks_accept_bounds_and_reject_beyond() -> None:
    checked = 0
    for declaration in setting_declarations():
        for bound, step in ((declaration.minimum, -1), (declaration.maximum, +1)):
            if bound is None:
                continue
            checked += 1
            assert getattr(Settings.from_env(environ={declaration.variable: str(bound)}), declaration.name) == bound
            beyond = bound + step * (1 if declaration.value_type is int else max(abs(bound) * 0.01, 0.01))
            with pytest.raises(SettingsError) as info:
                Settings.from_env(environ={declaration.variable: str(beyond)})
            assert str(info.value).startswith(f"{declaration.variable}={beyond}: ")
            assert str(info.value).endswith(declaration.fix_text)
    assert checked >= 30


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generated_range_checks_reject_non_finite_numbers(value: str) -> None:
    for declaration in setting_declarations():
        if declaration.value_type is float:
            with pytest.raises(SettingsError, match=f"^{declaration.variable}="):
                Settings.from_env(environ={declaration.variable: value})


def test_choices_are_enforced() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"LLMCO2_WORKER": "threads"})
    assert str(info.value) == (
        "LLMCO2_WORKER='threads': use 'process' (default: accounting off vLLM's engine process) or 'thread'."
    )
    assert Settings.from_env(environ={"LLMCO2_WORKER": "thread"}).worker == "thread"


def test_secret_is_hidden_from_repr_and_declared_so() -> None:
    (key,) = [d for d in setting_declarations() if d.secret]
    assert key.name == "grid_intensity_api_key"
    assert "hunter2" not in repr(Settings(grid_intensity_api_key="hunter2"))


def test_llmco2_key_of_the_file_must_be_a_table(tmp_path: Path) -> None:
    config = tmp_path / "scalar.toml"
    config.write_text("llmco2 = 5\n")
    with pytest.raises(SettingsError, match=r"\[llmco2\]"):
        Settings.from_env(environ={"LLMCO2_CONFIG": str(config)})


def test_readme_table_is_the_generated_one() -> None:
    readme = README.read_text(encoding="utf-8")
    assert readme.count(TABLE_START) == 1 and readme.count(TABLE_END) == 1
    block = readme.split(TABLE_START + "\n", 1)[1].split(TABLE_END, 1)[0]
    assert block == settings_table_markdown(), "run: python -m llmco2_vllm.settings --update-readme README.md"
    assert with_settings_table(readme) == readme


def test_table_has_one_row_per_setting_with_its_default() -> None:
    rows = settings_table_markdown().splitlines()[2:]
    assert len(rows) == len(setting_declarations())
    assert "| `LLMCO2_QUEUE_CAPACITY` | `8192` |" in rows[[d.name for d in setting_declarations()].index("queue_capacity")]
    assert any(row.startswith("| `LLMCO2_GRID_INTENSITY_REFRESH_SECONDS` | `300` | ") and "(10 to 86400;" in row for row in rows)
    assert any(row.startswith("| `LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS` | `3600` | ") and "(1 to 2592000)" in row for row in rows)
    assert any(row.startswith("| `LLMCO2_GRID_INTENSITY` | unset | ") for row in rows)


def test_update_readme_rewrites_only_the_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{TABLE_START}\n| stale |\n{TABLE_END}\n\nAfter.\n")
    assert main(["--update-readme", str(readme)]) == 0
    assert readme.read_text() == f"# Title\n\n{TABLE_START}\n{settings_table_markdown()}{TABLE_END}\n\nAfter.\n"
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == settings_table_markdown()
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="settings-table"):
        main(["--update-readme", str(readme)])
