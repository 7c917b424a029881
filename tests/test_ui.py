"""`tuneforge ui` over HTTP (Starlette's TestClient): the security rules, the runs index with true states, a
run's page and live stream, the editor's validation, save/load, parameter count and start, downloads, export
and chat."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import cli_run_config

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from tuneforge.cli import main
from tuneforge.run_status import STATUS_FILE, process_identity
from tuneforge.ui.app import create_app
from tuneforge.ui.security import MAX_BODY, Guard

LOCAL = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, task_file) -> Path:
    """A runs root with a finished run (trained by the command line), a killed one and a failed one."""
    root = tmp_path_factory.mktemp("runs")
    config = cli_run_config(tmp_path_factory.mktemp("cfg"), tiny_model_dir, task_file,
                            [{"lora": {"rank": 2, "targets": "all-linear"}}],
                            {"max_steps": 4, "eval_every": 2})
    raw = yaml.safe_load(config.read_text())
    raw["evaluation"] = {"samples": 1, "max_new_tokens": 4}
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--output", str(root / "done")]) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, record in (("killed", {"state": "running", "pid": dead.pid}),
                         ("broken", {"state": "failed", "pid": dead.pid,
                                     "error": "loss became nan at step 3"})):
        (root / "nested" / name).mkdir(parents=True)
        (root / "nested" / name / "config.yaml").write_text((root / "done" / "config.yaml").read_text())
        (root / "nested" / name / STATUS_FILE).write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard(None)


@pytest.fixture(scope="module")
def client(root, guard) -> TestClient:
    return TestClient(create_app(root, guard), base_url=LOCAL)


def csrf(guard: Guard) -> dict:
    return {"X-CSRF-Token": guard.csrf}


def events(text: str) -> list[tuple[str, object]]:
    found = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_loopback_server_serves_only_loopback_host_names(client, root, guard):
    assert client.get("/").status_code == 200
    assert TestClient(create_app(root, guard), base_url="http://localhost:7860").get("/").status_code == 200
    rebinding = TestClient(create_app(root, guard), base_url="http://attacker.example:7860").get("/")
    assert rebinding.status_code == 403 and "loopback" in rebinding.text


def test_token_is_needed_off_localhost(root):
    guard = Guard.for_host("0.0.0.0")
    assert guard.token and Guard.for_host("127.0.0.1").token is None and Guard.for_host("::1").token is None
    app = TestClient(create_app(root, guard), base_url="http://192.0.2.7:7860", follow_redirects=False)
    assert app.get("/").status_code == 401
    assert app.get("/events/runs?once=1").status_code == 401
    assert app.get("/?token=wrong").status_code == 401
    first = app.get(f"/run/done?token={guard.token}&x=1")
    assert first.status_code == 303 and first.headers["location"] == "/run/done?x=1"  # token out of the URL
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert app.get("/").status_code == 200  # the cookie now
    fresh = TestClient(create_app(root, guard), base_url="http://192.0.2.7:7860")
    assert fresh.get("/", headers={"Authorization": f"Bearer {guard.token}"}).status_code == 200
    assert fresh.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_state_changing_requests_are_same_origin_posts_with_the_csrf_token(client, guard, root):
    body = {"yaml": "model: x\n", "config_name": "a"}
    assert client.post("/api/save", json=body).status_code == 403  # no token
    assert client.post("/api/save", json=body, headers={"X-CSRF-Token": "stale"}).status_code == 403
    cross = client.post("/api/save", json=body, headers={**csrf(guard), "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.text
    fetch_site = client.post("/api/save", json=body, headers={**csrf(guard), "Sec-Fetch-Site": "cross-site"})
    assert fetch_site.status_code == 403
    form = client.post("/api/stop", data={"run": "done"})  # a plain form without the token
    assert form.status_code == 403
    big = client.post("/api/save", content=b"x" * (MAX_BODY + 1),
                      headers={**csrf(guard), "Content-Type": "application/json"})
    assert big.status_code == 413
    assert client.put("/api/save", json=body, headers=csrf(guard)).status_code == 405
    assert not (root / "configs" / "a.yaml").exists()  # none of them wrote anything
    same = client.post("/api/save", json=body, headers={**csrf(guard), "Origin": LOCAL})
    assert same.status_code == 200 and (root / "configs" / "a.yaml").read_text() == "model: x\n"
    assert client.get("/api/config?source=saved:a").json()["text"] == "model: x\n"


def test_paths_stay_inside_the_runs_root(client, guard, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("model: x\n")
    (outside / "results.json").write_text("{}")
    (root / "escape").symlink_to(outside)
    try:
        for url in ("/run/escape", "/run/%2e%2e/outside", "/run/done/..%2F..%2Fetc",
                    "/download/adapter?run=../x",
                    "/events/run?run=/etc&once=1", "/api/config?source=saved:../../x",
                    "/api/config?source=example:../../etc/passwd", "/compare/report/..%2Fx"):
            response = client.get(url)
            assert response.status_code in (400, 404), (url, response.status_code)
        assert "escape" not in client.get("/events/runs?once=1").text  # symlinks are not followed
        for name in ("../x", "a/b", ".hidden", ""):
            response = client.post("/api/save", json={"yaml": "model: x\n", "config_name": name},
                                   headers=csrf(guard))
            assert response.status_code == 400, name
    finally:
        (root / "escape").unlink()


def test_yaml_is_only_safe_loaded(client, guard, root, tmp_path):
    marker = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {marker}']\ndata: {{train: x.jsonl}}\n"
    result = client.post("/api/validate", json={"yaml": text, "config_name": "evil"},
                         headers=csrf(guard)).json()
    assert not result["ok"] and result["line"] == 1 and not marker.exists()


def test_runs_page_shows_every_run_in_its_true_state(client):
    kinds = dict(events(client.get("/events/runs?once=1").text))
    html = kinds["rows"]["html"]
    rows = {chunk.split('"', 1)[0]: chunk for chunk in html.split('<tr data-run="')[1:]}
    assert set(rows) == {"done", "nested/killed", "nested/broken"}
    assert 'class="state finished"' in rows["done"] and "4 / 4" in rows["done"]
    assert 'class="state killed"' in rows["nested/killed"]  # status "running", its process gone
    assert 'class="state failed"' in rows["nested/broken"] and "loss became nan" in rows["nested/broken"]
    page = client.get("/").text
    assert 'href="/run/done"' in page and 'id="runs-body"' in page


def test_run_page_and_its_live_stream(client, root):
    page = client.get("/run/done")
    assert page.status_code == 200
    assert "task loss" in page.text and "samples" in page.text.lower()
    assert 'id="before-after"' in page.text and "trainable parameters" in page.text
    assert 'id="download-adapter"' in page.text and "GGUF" in page.text
    lines = (root / "done" / "metrics.jsonl").read_text().splitlines()
    stream = client.get("/events/run?run=done&once=1")
    found = events(stream.text)
    records = [r for kind, data in found if kind == "metrics" for r in data]
    assert records == [json.loads(line) for line in lines]
    status = next(data for kind, data in found if kind == "status")
    assert status["state"] == "finished" and status["step"] == 4 and status["after"]["step"] == 4
    before = next(data for kind, data in found if kind == "before")
    evaluation = json.loads((root / "done" / "evaluation_before.json").read_text())
    assert before["eval"] == evaluation["eval"]["loss"]
    offset = int(next(line for line in stream.text.splitlines() if line.startswith("id: "))[4:])
    assert offset == (root / "done" / "metrics.jsonl").stat().st_size
    again = events(client.get("/events/run?run=done&once=1", headers={"Last-Event-ID": str(offset)}).text)
    assert not [kind for kind, _ in again if kind in ("metrics", "before")]  # a reconnect resends nothing


def test_editor_validation_names_the_line_and_start_refuses_a_taken_name(client, guard, root, tiny_model_dir,
                                                                       task_file):
    good = {"model": str(tiny_model_dir), "data": {"train": str(task_file)}, "retain": None,
            "strategies": [{"lora": {"rank": 2}}],
            "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 64}}
    text = yaml.safe_dump(good, sort_keys=False)
    ok = client.post("/api/validate", json={"yaml": text, "config_name": "mine"}, headers=csrf(guard)).json()
    assert ok["ok"] and "causal_lm" in ok["message"]
    bad_text = text.replace("rank: 2", "rank: -2")
    bad = client.post("/api/validate", json={"yaml": bad_text, "config_name": "mine"},
                      headers=csrf(guard)).json()
    line = next(i for i, row in enumerate(bad_text.splitlines(), 1) if "rank: -2" in row)
    assert not bad["ok"] and bad["line"] == line and bad["message"].startswith(f"mine.yaml:{line}: ")
    assert not list((root / "configs").glob(".check-*"))  # the checked copy is gone
    taken = client.post("/api/start", json={"yaml": text, "config_name": "mine", "run_name": "done"},
                        headers=csrf(guard))
    assert taken.status_code == 400 and "already there" in taken.json()["message"]
    invalid = client.post("/api/start", json={"yaml": bad_text, "config_name": "mine", "run_name": "new"},
                          headers=csrf(guard))
    assert invalid.status_code == 400 and invalid.json()["line"] == line and not (root / "new").exists()
    new_page = client.get("/new")
    assert "script-src" not in new_page.headers["content-security-policy"]  # default-src 'self': no inline
    new_page = new_page.text
    assert "data-snippet=\"  - lora: {" in new_page  # strategy options from the registry


def test_parameter_count_is_inspects(client, guard, tiny_model_dir, task_file):
    from tuneforge.config import validate_config
    from tuneforge.run import inspect_config

    raw = {"model": str(tiny_model_dir), "data": {"train": str(task_file)}, "retain": None,
           "strategies": [{"lora": {"rank": 2, "targets": "all-linear"}}], "train": {"max_seq_len": 64}}
    expected = inspect_config(validate_config(raw))
    counted = client.post("/api/inspect", json={"yaml": yaml.safe_dump(raw)}, headers=csrf(guard)).json()
    assert counted["ok"], counted
    assert (counted["trainable_params"], counted["total_params"]) == (expected["trainable_params"],
                                                                      expected["total_params"])


def test_adapter_download_export_and_chat(client, guard, root):
    archive = zipfile.ZipFile(io.BytesIO(client.get("/download/adapter?run=done").content))
    adapter = root / "done" / "adapter"
    assert sorted(archive.namelist()) == sorted(f"adapter/{p.name}" for p in adapter.iterdir())
    exported = client.post("/api/export", json={"run": "done"}, headers=csrf(guard)).json()
    assert exported["ok"], exported
    assert (root / "exports" / "done-merged" / "config.json").is_file()
    gguf = client.post("/api/export", json={"run": "done", "format": "gguf"}, headers=csrf(guard)).json()
    assert gguf["ok"], gguf
    assert (root / "exports" / "done-gguf" / "done-q8_0.gguf").stat().st_size > 0
    assert (root / "exports" / "done-gguf" / "Modelfile").is_file()
    chat = client.post("/api/chat", headers=csrf(guard),
                       json={"run": "done", "text": "What colour is the cat?", "max_new_tokens": 6}).json()
    assert chat["ok"] and not chat["base"].startswith("(failed)") and not chat["tuned"].startswith("(failed)")
    assert chat["base"] != chat["tuned"]  # the adapter changed what the model says
    empty = client.post("/api/chat", json={"run": "done", "text": " "}, headers=csrf(guard))
    assert empty.status_code == 400
    garbled = client.post("/api/chat", content=b"{not json", headers={**csrf(guard),
                                                                       "Content-Type": "application/json"})
    assert garbled.status_code == 400 and "not JSON" in garbled.text


def test_compare_takes_finished_runs_only(client, guard):
    none = client.post("/api/compare", data={"csrf": guard.csrf}, follow_redirects=False)
    assert none.status_code == 303 and "pick+at+least+one" in none.headers["location"]
    unfinished = client.post("/api/compare", data={"csrf": guard.csrf, "run[]": ["done", "nested/killed"]})
    assert unfinished.status_code == 400 and "nested/killed: not a finished run" in unfinished.text
    page = client.get("/compare").text
    assert 'value="done"' in page and 'value="nested/killed"' not in page


def test_ui_command_refuses_a_bad_port(capsys):
    assert main(["ui", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    assert process_identity(os.getpid())  # /proc is there: the states above were checked by process identity
