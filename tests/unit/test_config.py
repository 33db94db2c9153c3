"""Config loading: valid files load, every error names the file, the key and the rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.config import ConfigError, DuplicatePolicy, load_config, validate_ae_title
from tests.conftest import ROOT, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path / "store"}"\n' + text)
    return path


def test_example_config_is_valid_and_documented(tmp_path: Path) -> None:
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace('root = "/var/lib/msvlm-node"', f'root = "{tmp_path}"')
    path = tmp_path / "example.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.node.ae_title == "MSVLM" and config.node.port == 11112
    assert set(config.peers) == {"ct-scanner", "pacs"}
    assert config.storage.duplicate_policy is DuplicatePolicy.KEEP
    assert config.report.send_to == ("pacs",) and config.selection.body_parts is None
    assert config.worker.processes == 1 and config.delivery.max_retries == 10
    # every key set in the example carries a comment right above it (unit and default)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and not line.startswith("["):
            assert lines[i - 1].startswith("#") or lines[i - 1].startswith("["), line


def test_relative_storage_root_resolves_against_the_config_folder(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[storage]\nroot = "data"\n')
    assert load_config(path).storage.root == tmp_path / "data"
    assert load_config(path).storage.effective_database_url.endswith("data/index.sqlite")


@pytest.mark.parametrize("text, key, rule", [
    ('[node]\nae_title = "A_VERY_LONG_AE_TITLE"\n', "[node] ae_title", "longer than 16"),
    ('[node]\nae_title = "BAD\\\\AE"\n', "[node] ae_title", "backslash"),
    ('[node]\nae_title = "   "\n', "[node] ae_title", "only spaces"),
    ("[node]\nport = 70000\n", "[node] port", "not a TCP port"),
    ('[node]\nport = "104"\n', "[node] port", "must be of type int"),
    ("[node]\nmax_associations = 0\n", "[node] max_associations", "greater than zero"),
    ("[node]\nmax_pdu_bytes = 100\n", "[node] max_pdu_bytes", "4096"),
    ('[node]\nbind_address = "example"\n', "[node] bind_address", "not an IP address"),
    ("[node]\nprot = 104\n", "[node] prot", "unknown key"),
    ("[nodes]\nport = 104\n", "[nodes]", "unknown section"),
    ('[storage]\nduplicate_policy = "ignore"\n', "[storage] duplicate_policy", "keep"),
    ("[storage]\nmin_free_bytes = -1\n", "[storage] min_free_bytes", "negative"),
    ('[metrics]\nlisten = "9110"\n', "[metrics] listen", "host:port"),
    ('[metrics]\nlisten = "127.0.0.1:99999"\n', "[metrics] listen", "host:port"),
    ('[storage]\ndatabase_url = "not a url"\n', "[storage] database_url", "SQLAlchemy URL"),
    ("[completion]\nstable_age_s = 0\n", "[completion] stable_age_s", "greater than zero"),
    ('[peers.pacs]\nae_title = "PACS"\nport = 104\n', "[peers.pacs] host", "required"),
    ('[peers.pacs]\nae_title = "PACS"\nhost = "no-such-host.invalid"\nport = 104\n',
     "[peers.pacs] host", "does not resolve"),
    ('[peers.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
     '[peers.PACS]\nae_title = "P2"\nhost = "127.0.0.1"\nport = 105\n',
     "[peers.PACS]", "repeats [peers.pacs]"),
    ('[peers."a b"]\nae_title = "P"\nhost = "127.0.0.1"\nport = 1\n', "[peers.a b]", "peer name"),
    ('[tls]\ncertificate = "missing.pem"\n', "[tls] certificate", "not a readable file"),
    ('[model]\ncheckpoint = "nowhere"\n', "[model] checkpoint", "not a checkpoint folder"),
    ('[model]\ndevice = "tpu"\n', "[model] device", "not auto, cpu, cuda"),
    ("[model]\nthreads = -2\n", "[model] threads", "negative"),
    ('[report]\nsend_to = ["pacs"]\n', "[report] send_to", "'pacs' is not a configured peer"),
    ('[report]\nsend_to = "pacs"\n', "[report] send_to", "must be of type list"),
    ('[selection]\nplanes = ["axial", "transverse"]\n', "[selection] planes",
     "'transverse' is not one of"),
    ('[selection]\nphases = ["venous"]\n', "[selection] phases", "'venous' is not one of"),
    ("[selection]\nmodalities = []\n", "[selection] modalities", "non-empty list"),
    ("[selection]\nmin_slices = 0\n", "[selection] min_slices", "greater than zero"),
    ("[delivery]\nretry_delay_s = 60\nmax_retry_delay_s = 10\n",
     "[delivery] max_retry_delay_s", "less than retry_delay_s"),
    ("[delivery]\nmax_retries = -1\n", "[delivery] max_retries", "negative"),
    ("[worker]\ngpus = 2\n", "[worker] gpus", "unknown key"),
])
def test_errors_name_file_key_and_rule(tmp_path: Path, text: str, key: str, rule: str) -> None:
    path = write(tmp_path, text) if not text.startswith("[storage]") else tmp_path / "n.toml"
    if text.startswith("[storage]"):
        path.write_text(text + f'root = "{tmp_path / "s"}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert key in message and rule in message, message


def test_tls_key_required_with_certificate(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"\[tls\] private_key: is required"):
        load_config(write(tmp_path, '[tls]\ncertificate = "cert.pem"\n'))


def test_unwritable_storage_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nroot = "{blocker / "sub"}"\n')
    with pytest.raises(ConfigError, match=r"\[storage\] root: .* cannot be created"):
        load_config(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_ae_title_rules() -> None:
    assert validate_ae_title(" CT01 ") == "CT01"
    for bad in ["", "X" * 17, "A\\B", "É"]:
        with pytest.raises(ValueError):
            validate_ae_title(bad)


def test_check_config_command(tmp_path: Path) -> None:
    good = write(tmp_path, '[node]\nae_title = "NODE1"\n')
    result = run_cli("check-config", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert 'ae_title = "NODE1"' in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n')
    result = run_cli("check-config", "-c", str(bad))
    assert result.returncode == 78
    assert f"{bad}: [node] ae_title" in result.stderr
    # the default comes from $MSVLM_NODE_CONFIG
    result = run_cli("check-config", env={"MSVLM_NODE_CONFIG": str(good)})
    assert result.returncode == 0 and "NODE1" in result.stdout
    result = run_cli("check-config", env={"MSVLM_NODE_CONFIG": os.devnull + ".absent"})
    assert result.returncode == 78 and "no such file" in result.stderr
