"""Settings: defaults, env and TOML sources with their precedence, and errors that say the fix.

Every test passes its own ``environ`` mapping: the process environment is never read or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmco2_vllm.settings import Settings, SettingsError


def test_defaults_validate() -> None:
    settings = Settings.from_env(environ={})
    assert settings == Settings()
    assert settings.enabled is True
    assert settings.pue == 1.0
    assert settings.region == "WORLD"
    assert settings.grid_intensity is None
    assert settings.predictor == "analytic"
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
