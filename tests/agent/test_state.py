"""Activation state: permissions, binding, tamper refusal (pure file tests + the CLI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import state as statemod
from agent.errors import StateError, TamperedError
from agent.exitcodes import EXIT_STATE, EXIT_TAMPERED
from agent.keystore.file import FileKeystore
from protocol.client import new_client_key_and_csr
from protocol.proxy import ProxyConfig
from protocol.sealing import generate_keypair
from tests.agent.conftest import make_pki, run_agent_cli


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    key_pem, csr_pem = new_client_key_and_csr("t")
    seal_priv, _ = generate_keypair()
    pki = make_pki(tmp_path / "pki")
    ca_pem, cert_pem = pki.ca_pem, pki.issue_client(csr_pem)
    root = tmp_path / "state"
    statemod.write_state(
        root, statemod.PlatformEndpoint.parse("https://platform.example:8443"), "app1",
        ca_pem, cert_pem, key_pem, seal_priv, 1.0, FileKeystore(root),
    )
    return root


ALL_FILES = (*statemod.BOUND_FILES, *statemod.SECRET_NAMES, statemod.BINDING)


def make_legacy(state_dir: Path) -> None:
    """Rewrite *state_dir* as a version-1 state dir (before keystores), binding included."""
    doc = json.loads((state_dir / statemod.STATE_JSON).read_text())
    doc["version"] = 1
    del doc["keystore"]
    (state_dir / statemod.STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    contents = {n: (state_dir / n).read_bytes() for n in statemod.BOUND_FILES}
    key = statemod._binding_key(
        (state_dir / statemod.KEY_PEM).read_bytes(), (state_dir / statemod.SEAL_KEY).read_bytes()
    )
    (state_dir / statemod.BINDING).write_text(statemod._binding_mac(key, contents) + "\n")


def test_version_1_state_dirs_still_load_as_file_keystores(state_dir: Path) -> None:
    """Appliances activated before keystores existed keep booting."""
    make_legacy(state_dir)
    st = statemod.load_state(state_dir)
    assert st.keystore.kind == "file" and st.appliance == "app1"
    assert st.keystore.next_boot() == 1 and st.keystore.next_boot() == 2
    st.forget()
    # ...and a version-1 doc that names a keystore is not something we ever wrote.
    doc = json.loads((state_dir / statemod.STATE_JSON).read_text())
    doc["keystore"] = {"kind": "file"}
    (state_dir / statemod.STATE_JSON).write_text(json.dumps(doc))
    with pytest.raises(TamperedError):
        statemod.load_state(state_dir)


def test_version_1_state_dir_with_a_proxy_still_loads(tmp_path: Path) -> None:
    """A v1 dir written with a proxy (clear proxy-credentials file, in the MAC) boots with it."""
    key_pem, csr_pem = new_client_key_and_csr("t")
    seal_priv, _ = generate_keypair()
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "state"
    proxy = ProxyConfig.parse("http://127.0.0.1:3128", b"user:pw-v1")
    statemod.write_state(
        root, statemod.PlatformEndpoint.parse("https://platform.example:8443"), "app1",
        pki.ca_pem, pki.issue_client(csr_pem), key_pem, seal_priv, 1.0, FileKeystore(root),
        proxy=proxy,
    )
    doc = json.loads((root / statemod.STATE_JSON).read_text())
    doc["version"] = 1
    del doc["keystore"]
    (root / statemod.STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    contents: dict[str, bytes | bytearray] = {n: (root / n).read_bytes() for n in statemod.BOUND_FILES}
    contents[statemod.PROXY_CREDENTIALS] = (root / statemod.PROXY_CREDENTIALS).read_bytes()
    key = statemod._binding_key(key_pem, seal_priv)
    (root / statemod.BINDING).write_text(statemod._binding_mac(key, contents) + "\n")
    st = statemod.load_state(root)
    try:
        assert st.keystore.kind == "file" and st.proxy == proxy
    finally:
        st.forget()
    # Dropping the proxy from the v1 doc (a direct connection) is refused like in v2.
    del doc["proxy"]
    (root / statemod.STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(TamperedError):
        statemod.load_state(root)


def test_keystore_entry_is_bound(state_dir: Path) -> None:
    """Editing the keystore entry (here: adding a field) fails the binding check."""
    doc = json.loads((state_dir / statemod.STATE_JSON).read_text())
    doc["keystore"]["note"] = "edited"
    (state_dir / statemod.STATE_JSON).write_text(json.dumps(doc))
    with pytest.raises(TamperedError, match="binding"):
        statemod.load_state(state_dir)


def test_written_state_loads_with_strict_permissions(state_dir: Path) -> None:
    assert oct(state_dir.stat().st_mode & 0o777) == "0o700"
    for name in ALL_FILES:
        assert oct((state_dir / name).stat().st_mode & 0o777) == "0o600", name
    st = statemod.load_state(state_dir)
    assert st.endpoint.url == "https://platform.example:8443"
    assert st.endpoint.host == "platform.example" and st.endpoint.port == 8443
    assert st.appliance == "app1"
    seal_hex = (state_dir / statemod.SEAL_KEY).read_bytes().hex()
    assert seal_hex not in repr(st) and "seal" not in repr(st).lower().replace("agentstate", "")


def test_forget_overwrites_the_sealing_key(state_dir: Path) -> None:
    st = statemod.load_state(state_dir)
    key = st.seal_private()
    assert any(key)
    st.forget()
    assert not any(key)
    with pytest.raises(StateError):
        st.seal_private()


@pytest.mark.parametrize(
    "edit",
    [
        "url",
        "ca",
        "cert",
        "mac",
        "missing",
    ],
)
def test_any_edit_is_refused(state_dir: Path, edit: str) -> None:
    if edit == "url":
        doc = json.loads((state_dir / statemod.STATE_JSON).read_text())
        doc["platform_url"] = "https://evil.example:443"
        (state_dir / statemod.STATE_JSON).write_text(json.dumps(doc))
    elif edit == "ca":
        other = make_pki(state_dir.parent / "other")
        (state_dir / statemod.CA_PEM).write_bytes(other.ca_pem)
    elif edit == "cert":
        data = bytearray((state_dir / statemod.CERT_PEM).read_bytes())
        data[100] ^= 1
        (state_dir / statemod.CERT_PEM).write_bytes(bytes(data))
    elif edit == "mac":
        (state_dir / statemod.BINDING).write_text("00" * 32 + "\n")
    elif edit == "missing":
        (state_dir / statemod.CA_PEM).unlink()
    with pytest.raises(TamperedError):
        statemod.load_state(state_dir)


def test_swapping_ca_and_recomputing_nothing_else_is_refused(state_dir: Path) -> None:
    """Even a consistent-looking swap (valid PEM of another CA) fails the binding."""
    other = make_pki(state_dir.parent / "other2")
    (state_dir / statemod.CA_PEM).write_bytes(other.ca_pem)
    with pytest.raises(TamperedError, match="binding"):
        statemod.load_state(state_dir)


def test_loose_permissions_are_refused(state_dir: Path) -> None:
    os.chmod(state_dir / statemod.KEY_PEM, 0o644)
    with pytest.raises(StateError, match="mode 0644"):
        statemod.load_state(state_dir)
    os.chmod(state_dir / statemod.KEY_PEM, 0o600)
    os.chmod(state_dir, 0o755)
    with pytest.raises(StateError, match="mode 0755"):
        statemod.load_state(state_dir)


def test_activation_refuses_a_non_empty_dir(state_dir: Path) -> None:
    key_pem, _ = new_client_key_and_csr("t")
    with pytest.raises(StateError, match="not empty"):
        statemod.write_state(
            state_dir, statemod.PlatformEndpoint.parse("https://x.example"), "a",
            b"", b"", key_pem, b"\0" * 32, 0.0, FileKeystore(state_dir),
        )


@pytest.mark.parametrize(
    "url", ["http://p.example", "https://", "https://p.example/path", "https://u@p.example",
            "https://p.example:99999"],
)
def test_platform_url_validation(url: str) -> None:
    with pytest.raises(ValueError):
        statemod.PlatformEndpoint.parse(url)


def test_cli_refuses_tampered_state_in_one_line(state_dir: Path) -> None:
    doc = json.loads((state_dir / statemod.STATE_JSON).read_text())
    doc["platform_url"] = "https://127.0.0.1:1"
    (state_dir / statemod.STATE_JSON).write_text(json.dumps(doc))
    r = run_agent_cli("run", str(state_dir), "--once")
    assert r.returncode == EXIT_TAMPERED
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scanner-agent: ")
    assert "modified after activation" in lines[0] and "Traceback" not in r.stderr


def test_cli_missing_state_and_usage(tmp_path: Path) -> None:
    r = run_agent_cli("run", str(tmp_path / "nope"))
    assert r.returncode == EXIT_STATE and len(r.stderr.strip().splitlines()) == 1
    r = run_agent_cli("run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_agent_cli("activate", str(tmp_path / "s"), "--platform", "http://x",
                      "--ca", str(tmp_path / "missing.pem"), "--code", "abc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_hybrid_key_is_optional_stored_once_and_checked(state_dir: Path) -> None:
    """An appliance from before sealing v2 loads without the hybrid key; the upgrade adds it
    next to the X25519 key (0600) and never replaces it; a damaged one is refused."""
    from protocol import api, sealing

    st = statemod.load_state(state_dir)
    assert not st.has_hybrid_key
    priv, pub = sealing.generate_hybrid_keypair()
    blob = sealing.seal_v2(pub, b"vk" * 16, api.SEAL_CONTEXT_VOLUME_KEY)
    with pytest.raises(sealing.SealError, match="seal-key upgrade"):
        st.open_sealed(blob, api.SEAL_CONTEXT_VOLUME_KEY)
    statemod.store_hybrid_key(FileKeystore(state_dir), priv)
    path = state_dir / statemod.SEAL_KEY_HYBRID
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(StateError):
        statemod.store_hybrid_key(FileKeystore(state_dir), priv)
    st = statemod.load_state(state_dir)
    assert st.has_hybrid_key
    assert st.open_sealed(blob, api.SEAL_CONTEXT_VOLUME_KEY) == bytearray(b"vk" * 16)
    v1 = sealing.seal(sealing.public_from_private(bytes(st.seal_private())), b"x", b"credential")
    assert st.open_sealed(v1, b"credential") == bytearray(b"x")  # v1 blobs still open
    st.forget()
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(TamperedError, match="hybrid"):
        statemod.load_state(state_dir)
