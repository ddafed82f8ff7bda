"""Settings: file, environment and CLI overrides; invalid values name their key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.errors import ConfigError
from dicom_node.cli.main import build_parser, settings_from_args
from dicom_node.settings import DEFAULT_CONFIG, load_settings


def test_defaults_from_packaged_file() -> None:
    settings = load_settings(environ={})
    assert settings.network.ae_title == "AD_NODE"
    assert settings.destinations[0].ae_title == "PACS"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("node.sqlite3")


def test_environment_overrides_file() -> None:
    env = {
        "DICOM_NODE_NETWORK__PORT": "11199",
        "DICOM_NODE_NETWORK__ALLOWED_CALLING_AE_TITLES": "CT1,MR2",
        "DICOM_NODE_DATABASE__URL": "postgresql+psycopg://u@h/db",
        "DICOM_NODE_MODEL__DEVICE": "cuda:1",
    }
    settings = load_settings(environ=env)
    assert settings.network.port == 11199
    assert settings.network.allowed_calling_ae_titles == ("CT1", "MR2")
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.model.device == "cuda:1"


def test_cli_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_NETWORK__PORT", "11199")
    args = build_parser().parse_args(["serve", "--port", "11300", "--ae-title", "NODE2"])
    settings = settings_from_args(args)
    assert settings.network.port == 11300
    assert settings.network.ae_title == "NODE2"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DICOM_NODE_NETWORK__PORT": "eleven"}, "network.port"),
        ({"DICOM_NODE_NETWORK__PORT": "70000"}, "network.port"),
        ({"DICOM_NODE_NETWORK__AE_TITLE": "A_TITLE_FAR_TOO_LONG"}, "network.ae_title"),
        ({"DICOM_NODE_MODEL__DEVICE": "tpu"}, "model.device"),
        ({"DICOM_NODE_COMPLETENESS__QUIET_PERIOD_S": "-1"}, "completeness.quiet_period_s"),
        ({"DICOM_NODE_PROCESSING__REGISTRATION": "Rigidish"}, "processing.registration"),
        ({"DICOM_NODE_NETWORK__UNKNOWN_KEY": "1"}, "network.unknown_key"),
        ({"DICOM_NODE_PRIOR__MOVE_DESTINATION": "A_TITLE_FAR_TOO_LONG"}, "prior.move_destination"),
        ({"DICOM_NODE_PRIOR__PACS__AE_TITLE": "BAD\\AE"}, "prior.pacs.ae_title"),
    ],
)
def test_invalid_value_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid setting .*{key}"):
        load_settings(environ=env)


def test_bad_destination_port_names_the_key(tmp_path: Path) -> None:
    # Every "port = N" line to 0: valid for the listener (any free port), not for a destination.
    text = re.sub(r"^port = \d+$", "port = 0", DEFAULT_CONFIG.read_text(), flags=re.MULTILINE)
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"destinations\.0\.port"):
        load_settings(path, environ={})


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_unknown_destination_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown destination 'archive'"):
        load_settings(environ={}).destination("archive")


def test_all_digit_secrets_are_read_as_text(tmp_path: Path) -> None:
    # TOML and the environment parse a bare 20-digit value as a number; a token or a secret keeps its digits.
    config = tmp_path / "node.toml"
    config.write_text('[http]\nadmin_token = 12345678901234567890\n'
                      '[[notifications.webhooks]]\nname = "chat"\nurl = "https://chat.example.org/h"\n'
                      'secret = 98765432109876543210\n', encoding="utf-8")
    settings = load_settings(config, environ={})
    assert settings.http.admin_token == "12345678901234567890"
    assert settings.notifications.webhooks[0].secret.get_secret_value() == "98765432109876543210"
    from_env = load_settings(config, environ={"DICOM_NODE_HTTP__ADMIN_TOKEN": "11112222333344445555"})
    assert from_env.http.admin_token == "11112222333344445555"


def test_short_all_digit_token_is_refused_with_its_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[http]\nadmin_token = 1234\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"http\.admin_token"):
        load_settings(config, environ={})
