"""Uploads waiting in gradio's upload folder count against the workspace quota on a shared
server (ui/upload_room.py, wired by app.py): past the quota, gradio's upload route refuses."""
import app
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ui import upload_room
from ui.upload_room import UploadRoom


def uploads_app(folder, quota):
    async def upload(request):
        data = await request.body()
        (folder / f"up{len(list(folder.iterdir()))}").write_bytes(data)
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/gradio_api/upload", upload, methods=["POST"]),
                              Route("/gradio_api/other", upload, methods=["POST"])])
    return TestClient(UploadRoom(inner, quota=lambda: quota, folders=lambda: [folder]))


def test_uploads_past_the_quota_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(upload_room, "MEASURE_SECONDS", 0.0)  # measure every time here
    client = uploads_app(tmp_path, quota=100)
    assert client.post("/gradio_api/upload", content=b"x" * 60).status_code == 200
    assert client.post("/gradio_api/upload", content=b"x" * 60).status_code == 200  # 60 < 100
    refused = client.post("/gradio_api/upload", content=b"x" * 10)                # 120 >= 100
    assert refused.status_code == 507 and "--quota-gb" in refused.text
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) == 120   # nothing more written
    assert client.post("/gradio_api/other", content=b"x").status_code == 200  # other routes


def test_no_quota_no_refusal(tmp_path):
    client = uploads_app(tmp_path, quota=None)
    for _ in range(3):
        assert client.post("/gradio_api/upload", content=b"x" * 100).status_code == 200


def test_only_a_shared_server_counts_uploads(tmp_path):
    assert app.app_kwargs(False, tmp_path) == {}
    (middleware,) = app.app_kwargs(True, tmp_path)["middleware"]
    assert middleware.cls is UploadRoom
