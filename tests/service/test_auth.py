"""API keys and scopes: 401 and 403 in the error envelope, the keys file, the keys command, and
the rule that the service runs open only where it may."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_inputs import png

from service import auth
from service.app import create_app
from service.auth import AccessConfigError, check_open_access, keys_file_line, parse_keys
from service.keys import main as keys_main
from service.keys import new_key
from service.logs import JsonFormatter

KEYS = {
    "clinic": ("infer",),
    "ops": ("models:read", "metrics"),
    "all": ("infer", "models:read", "metrics"),
}


@pytest.fixture(scope="module")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A keys file with the keys of KEYS, and the keys themselves by id."""
    keys = {key_id: new_key() for key_id in KEYS}
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    lines = [keys_file_line(key_id, KEYS[key_id], key) for key_id, key in keys.items()]
    path.write_text("# test keys\n\n" + "\n".join(lines) + "\n")
    return path, keys


@pytest.fixture(scope="module")
def authed(tiny_model_dir, api_keys):
    """A client of an app that requires the keys of `api_keys`."""
    from conftest import make_settings

    app = create_app(make_settings(tiny_model_dir, API_KEYS_FILE=api_keys[0]))
    with TestClient(app) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_png(client, **headers: str):
    return client.post("/classify", content=png(), headers={"Content-Type": "image/png", **headers})


def test_without_a_key_the_image_endpoints_answer_401_in_the_envelope(authed):
    response = post_png(authed)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="busi"'
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert error["request_id"] == response.headers["X-Request-ID"]
    for path in ("/segment", "/diagnose", "/dicomweb/studies"):
        assert authed.post(path, content=b"x").status_code == 401, path


def test_an_unknown_key_is_401_and_a_key_without_the_scope_403(authed, api_keys):
    client, keys = authed, api_keys[1]
    response = post_png(client, **bearer(new_key()))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    response = post_png(client, **bearer(keys["ops"]))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert 'scope="infer"' in response.headers["WWW-Authenticate"]
    assert client.get("/models", headers=bearer(keys["clinic"])).status_code == 403
    assert client.get("/metrics", headers=bearer(keys["clinic"])).status_code == 403


def test_each_scope_opens_its_endpoints_and_the_probes_need_none(authed, api_keys):
    client, keys = authed, api_keys[1]
    assert post_png(client, **bearer(keys["clinic"])).status_code == 200
    assert client.get("/models", headers=bearer(keys["ops"])).status_code == 200
    assert client.get("/metrics", headers=bearer(keys["ops"])).status_code == 200
    assert post_png(client, **bearer(keys["all"])).status_code == 200
    for open_path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path
    assert client.get("/models").status_code == 401
    assert client.get("/metrics").status_code == 401


def test_logs_name_the_key_id_never_the_key(authed, api_keys, caplog):
    client, keys = authed, api_keys[1]
    with caplog.at_level(logging.DEBUG):
        assert post_png(client, **bearer(keys["clinic"])).status_code == 200
        post_png(client, **bearer(keys["ops"]))
    (record,) = [r for r in caplog.records if getattr(r, "status", None) == 200]
    assert record.key_id == "clinic"
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert not [key for key in keys.values() if key in text]


def test_a_key_deleted_from_the_file_stops_working(serve, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    keep, drop = new_key(), new_key()
    path = tmp_path / "api_keys"
    path.write_text(
        keys_file_line("keep", ["infer"], keep) + "\n" + keys_file_line("drop", ["infer"], drop)
    )
    with serve(tiny_model_dir, API_KEYS_FILE=path) as client:
        assert post_png(client, **bearer(drop)).status_code == 200
        time.sleep(0.01)  # a new modification time
        path.write_text(keys_file_line("keep", ["infer"], keep) + "\n")
        assert post_png(client, **bearer(drop)).status_code == 401
        assert post_png(client, **bearer(keep)).status_code == 200
        path.write_text("not a keys file\n")  # a bad edit keeps the keys that were in force
        assert post_png(client, **bearer(keep)).status_code == 200


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("a infer\n", "expected"),
        ("a infer,admin sha256:" + "0" * 64, "unknown scope"),
        ("a infer sha256:abc", "sha256"),
        ("a/b infer sha256:" + "0" * 64, "key id"),
        (("a infer sha256:" + "0" * 64 + "\n") * 2, "twice"),
    ],
)
def test_a_malformed_keys_file_is_refused_naming_the_line(text, complaint):
    with pytest.raises(AccessConfigError, match=complaint) as caught:
        parse_keys(text)
    assert "line " in str(caught.value)


def test_a_missing_keys_file_stops_the_start_up(tmp_path, tiny_model_dir):
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(MODEL_DIR=tiny_model_dir, API_KEYS_FILE=tmp_path / "absent")
    with pytest.raises(AccessConfigError, match="service.keys create"):
        create_app(settings)


def test_open_access_only_on_loopback_unless_allowed(caplog):
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        check_open_access("127.0.0.1", None, allow_open=False)
    assert "authentication is OFF" in caplog.text
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(AccessConfigError, match="ALLOW_OPEN_ACCESS"):
            check_open_access(host, None, allow_open=False)
    check_open_access("0.0.0.0", None, allow_open=True)


def test_the_service_refuses_to_start_open_on_all_interfaces(monkeypatch, caplog):
    import service.__main__ as entry
    from service.settings import Settings

    monkeypatch.setattr(entry, "configure_logging", lambda level, fmt: None)
    monkeypatch.setattr(entry, "get_settings", lambda: Settings(HOST="0.0.0.0"))
    with caplog.at_level(logging.CRITICAL), pytest.raises(SystemExit) as exit_:
        entry.main()
    assert exit_.value.code == 2
    assert "refusing to serve without API keys on 0.0.0.0" in caplog.text


def test_keys_command_creates_a_key_that_the_service_accepts(
    serve, tiny_model_dir, tmp_path, capsys
):
    keys_file = tmp_path / "api_keys"
    create = ["create", "--scopes", "infer,models:read", "--id", "pacs", "--file", str(keys_file)]
    assert keys_main(create) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("busi_") and len(key) > 40
    assert key not in keys_file.read_text()  # only its digest is stored
    (entry,) = parse_keys(keys_file.read_text())
    assert entry.key_id == "pacs" and entry.scopes == {"infer", "models:read"}
    assert keys_main(create) == 1
    assert "already has" in capsys.readouterr().err
    assert keys_main(["create", "--scopes", "admin"]) == 2
    with serve(tiny_model_dir, API_KEYS_FILE=keys_file) as client:
        assert post_png(client, **bearer(key)).status_code == 200
