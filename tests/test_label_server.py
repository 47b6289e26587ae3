"""The labelling server over HTTP: listing, accept, undo, skip, grid accepts, and what it refuses."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from visiond.data.inbox import list_inbox, prediction_dict, write_inbox_item
from visiond.data.manifest import add_image, read_manifest, write_manifest
from visiond.label.server import TOKEN_HEADER, make_server

SECRET = b"TOPSECRET-not-for-the-browser"


def _image(seed: int, size: int = 16) -> np.ndarray:
    """A distinct small BGR image per seed (distinct bytes: content-addressed file names)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _inbox(ds: Path, guesses: list[str | None], start: int = 0) -> list[str]:
    ids = []
    for i, guess in enumerate(guesses, start):
        pred = None if guess is None else prediction_dict(guess, 0.61, [(guess, 0.61), ("ok", 0.2), ("spot", 0.1)],
                                                            "smallcnn", "v1")
        item = write_inbox_item(ds, _image(100 + i), {"camera": "line1", "captured_at": 1_700_000_000 + i,
                                                       "source": "rtsp://u:pw@10.0.0.5/s", "rule": "low_score",
                                                       "prediction": pred})
        ids.append(item.id)
    return ids


@pytest.fixture
def dataset(tmp_path):
    """A dataset with two labelled images (classes ok, scratch) and four inbox items."""
    ds = tmp_path / "ds"
    rows = [add_image(ds, _image(1), "ok", split="train"), add_image(ds, _image(2), "scratch", split="train")]
    write_manifest(ds, rows)
    ids = _inbox(ds, ["scratch", "spot", None, "ok"])
    return ds, ids


@pytest.fixture
def server(dataset):
    srv = make_server(dataset[0], port=0).start()
    yield srv
    srv.close()


def request(srv, method: str, path: str, body: object = None, *, token: str | None = "auto",
            host: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """A raw HTTP request (http.client sends the path byte for byte: no client-side normalising)."""
    port = srv.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {"Host": host or f"127.0.0.1:{port}", **(headers or {})}
    if token is not None:
        hdrs[TOKEN_HEADER] = srv.token if token == "auto" else token
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def api(srv, path: str, body: object = None, **kw) -> tuple[int, dict]:
    status, raw = request(srv, "POST" if body is not None else "GET", path, body, **kw)
    return status, json.loads(raw)


def state(srv) -> dict:
    status, s = api(srv, "/api/state")
    assert status == 200
    return s


def test_state_lists_the_inbox_oldest_first_with_classes_and_progress(server, dataset):
    ds, ids = dataset
    s = state(server)
    # classes: the manifest's plus the predictions', sorted
    assert s["classes"] == ["ok", "scratch", "spot"]
    assert [i["id"] for i in s["items"]] == ids
    first = s["items"][0]
    assert first["prediction"]["label"] == "scratch" and first["camera"] == "line1"
    assert first["source"] == "rtsp://u:***@10.0.0.5/s"
    assert s["items"][2]["prediction"] is None
    assert (s["labelled"], s["left"], s["total"], s["undo"]) == (0, 4, 4, 0)
    # and every listed image is served
    status, png = request(server, "GET", first["url"])
    assert status == 200 and png.startswith(b"\x89PNG")


def test_page_carries_the_token_and_strict_headers(server):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200
    assert f'content="{server.token}"' in page and "{{TOKEN}}" not in page
    assert "frame-ancestors 'none'" in resp.getheader("Content-Security-Policy")
    assert resp.getheader("X-Frame-Options") == "DENY"
    for path in ("/static/app.js", "/static/style.css"):
        assert request(server, "GET", path)[0] == 200


def test_accept_moves_the_image_and_appends_one_manifest_row(server, dataset):
    ds, ids = dataset
    before = read_manifest(ds)
    status, r = api(server, "/api/accept", {"ids": [ids[0]], "label": "ok"})
    assert status == 200, r
    assert r["accepted"] == [{"id": ids[0], "label": "ok"}]
    assert (r["labelled"], r["left"], r["total"]) == (1, 3, 4)
    # the inbox no longer has it; the dataset does, with one more manifest row
    assert not (ds / "inbox" / f"{ids[0]}.png").exists() and not (ds / "inbox" / f"{ids[0]}.json").exists()
    after = read_manifest(ds)
    assert [s.path for s in after[:-1]] == [s.path for s in before]
    row = after[-1]
    assert row.label == "ok" and row.extra["inbox_id"] == ids[0] and row.extra["predicted_label"] == "scratch"
    assert (ds / row.path).is_file() and row.path.startswith("images/ok/")
    assert request(server, "GET", f"/files/{row.path}")[0] == 200
    assert not [p for p in ds.iterdir() if p.name.endswith(".tmp")]
    # accepting it again: it is gone
    status, r = api(server, "/api/accept", {"ids": [ids[0]], "label": "ok"})
    assert status == 404 and "not in the inbox" in r["error"]
    assert len(read_manifest(ds)) == len(after)


def test_undo_returns_the_item_with_its_original_sidecar_and_shows_it_first(server, dataset):
    ds, ids = dataset
    sidecar = (ds / "inbox" / f"{ids[1]}.json").read_bytes()
    before = read_manifest(ds)
    api(server, "/api/accept", {"ids": [ids[0]], "label": "ok"})
    after_first = [s.path for s in read_manifest(ds)]
    api(server, "/api/accept", {"ids": [ids[1]], "label": "spot"})
    path = read_manifest(ds)[-1].path
    status, r = api(server, "/api/undo", {})
    assert status == 200 and r["restored"] == [ids[1]]
    assert (r["labelled"], r["left"]) == (1, 3)
    # back in the inbox byte for byte (full top-k kept), out of the manifest and of images/
    assert (ds / "inbox" / f"{ids[1]}.json").read_bytes() == sidecar
    assert (ds / "inbox" / f"{ids[1]}.png").is_file()
    assert [s.path for s in read_manifest(ds)] == after_first
    assert not (ds / path).exists()
    assert state(server)["items"][0]["id"] == ids[1]
    # undo again takes back the first accept; then nothing is left to undo
    assert api(server, "/api/undo", {})[1]["restored"] == [ids[0]]
    assert [s.path for s in read_manifest(ds)] == [s.path for s in before]
    assert [i["id"] for i in state(server)["items"]][:2] == [ids[0], ids[1]]
    status, r = api(server, "/api/undo", {})
    assert status == 404 and "nothing to undo" in r["error"]


def test_skip_shows_the_item_last_and_leaves_it_in_the_inbox(server, dataset):
    ds, ids = dataset
    status, _ = api(server, "/api/skip", {"id": ids[0]})
    assert status == 200
    order = [i["id"] for i in state(server)["items"]]
    assert order == ids[1:] + ids[:1]
    assert state(server)["items"][-1]["skipped"] is True
    assert (ds / "inbox" / f"{ids[0]}.png").is_file()
    assert len(list_inbox(ds)) == 4


def test_discard_sets_items_aside_out_of_the_manifest_and_undo_brings_them_back(server, dataset):
    ds, ids = dataset
    n = len(read_manifest(ds))
    sidecar = (ds / "inbox" / f"{ids[1]}.json").read_bytes()
    # when two frames are discarded (one step, e.g. from the grid)
    status, r = api(server, "/api/discard", {"ids": ids[:2]})
    # then they leave the inbox for discarded/, the manifest is untouched, progress counts them
    assert status == 200 and r["set_aside"] == ids[:2] and r["discarded"] == 2
    assert [i.id for i in list_inbox(ds)] == ids[2:]
    assert sorted(p.name for p in (ds / "discarded").iterdir()) == sorted(
        f"{i}{suffix}" for i in ids[:2] for suffix in (".png", ".json"))
    assert len(read_manifest(ds)) == n
    s = state(server)
    assert (s["discarded"], s["left"], s["total"]) == (2, 2, 4)
    # and a discarded frame is not served, nor can it be labelled
    assert request(server, "GET", f"/files/discarded/{ids[0]}.png")[0] == 403
    assert api(server, "/api/accept", {"ids": [ids[0]], "label": "ok"})[0] == 404
    # when undone, then both are back, complete, shown first
    assert sorted(api(server, "/api/undo", {})[1]["restored"]) == sorted(ids[:2])
    assert sorted(i.id for i in list_inbox(ds)) == sorted(ids)
    assert (ds / "inbox" / f"{ids[1]}.json").read_bytes() == sidecar
    assert [i["id"] for i in state(server)["items"]][:2] in (ids[:2], ids[1::-1])
    assert state(server)["discarded"] == 0
    # and discarding what is not in the inbox is refused without moving anything
    assert api(server, "/api/discard", {"ids": [ids[0], "20990101T000000000000Z_cam_deadbeef"]})[0] == 404
    assert api(server, "/api/discard", {"ids": []})[0] == 400
    assert len(list_inbox(ds)) == 4


def test_grid_accepts_many_as_one_undo_step(server, dataset):
    ds, ids = dataset
    n = len(read_manifest(ds))
    status, r = api(server, "/api/accept", {"ids": ids[:3], "label": "spot"})
    assert status == 200 and [a["id"] for a in r["accepted"]] == ids[:3]
    rows = read_manifest(ds)
    assert len(rows) == n + 3 and {s.label for s in rows[n:]} == {"spot"}
    assert [i["id"] for i in state(server)["items"]] == ids[3:]
    # one Backspace brings all three back
    assert sorted(api(server, "/api/undo", {})[1]["restored"]) == sorted(ids[:3])
    assert len(read_manifest(ds)) == n and len(list_inbox(ds)) == 4


def test_a_grid_accept_with_an_unknown_id_changes_nothing(server, dataset):
    ds, ids = dataset
    n = len(read_manifest(ds))
    status, r = api(server, "/api/accept", {"ids": [ids[0], "20990101T000000000000Z_cam_deadbeef"], "label": "ok"})
    assert status == 404
    assert len(read_manifest(ds)) == n and len(list_inbox(ds)) == 4


def test_an_image_already_labelled_so_adds_no_row_and_undo_still_returns_it(tmp_path):
    ds = tmp_path / "ds"
    a = write_inbox_item(ds, _image(5), {"camera": "c", "captured_at": 1.0})
    b = write_inbox_item(ds, _image(5), {"camera": "c", "captured_at": 2.0})
    srv = make_server(ds, port=0, classes=["ok"]).start()
    try:
        assert api(srv, "/api/accept", {"ids": [a.id], "label": "ok"})[0] == 200
        sidecar_b = b.sidecar_path.read_bytes()
        assert api(srv, "/api/accept", {"ids": [b.id], "label": "ok"})[0] == 200
        rows = read_manifest(ds)
        assert [s.extra["inbox_id"] for s in rows] == [a.id] and list_inbox(ds) == []
        assert state(srv)["labelled"] == 2
        # undo brings b back as it was and leaves a's row and file alone
        assert api(srv, "/api/undo", {})[1]["restored"] == [b.id]
        assert [i.id for i in list_inbox(ds)] == [b.id] and b.sidecar_path.read_bytes() == sidecar_b
        assert read_manifest(ds) == rows and (ds / rows[0].path).is_file()
        # and then a's accept undoes normally
        assert api(srv, "/api/undo", {})[1]["restored"] == [a.id]
        assert read_manifest(ds) == [] and [i.id for i in list_inbox(ds)] == [a.id, b.id]
        assert not (ds / rows[0].path).exists()
    finally:
        srv.close()


@pytest.mark.parametrize("label", ["../evil", "a/b", "..", ".", "", "back\\slash", "tab\there", "nope", 5, None])
def test_bad_labels_are_refused_and_nothing_moves(server, dataset, label):
    ds, ids = dataset
    n = len(read_manifest(ds))
    status, r = api(server, "/api/accept", {"ids": [ids[0]], "label": label})
    assert status == 400, r
    assert len(read_manifest(ds)) == n and (ds / "inbox" / f"{ids[0]}.png").is_file()
    assert sorted(p.name for p in (ds / "images").iterdir()) == ["ok", "scratch"]


@pytest.mark.parametrize("ids", [["../manifest"], ["inbox/x"], ["/etc/passwd"], [".hidden"], "notalist", [], [7]])
def test_bad_ids_are_refused(server, ids):
    status, r = api(server, "/api/accept", {"ids": ids, "label": "ok"})
    assert status == 400, r
    assert api(server, "/api/skip", {"id": "../x"})[0] == 400


def test_added_classes_are_checked_and_then_accepted(server, dataset):
    ds, ids = dataset
    assert api(server, "/api/accept", {"ids": [ids[0]], "label": "dent"})[0] == 400
    assert api(server, "/api/classes", {"name": "a/b"})[0] == 400
    status, r = api(server, "/api/classes", {"name": "dent"})
    assert status == 200 and r["classes"][-1] == "dent"
    assert api(server, "/api/accept", {"ids": [ids[0]], "label": "dent"})[0] == 200
    assert read_manifest(ds)[-1].label == "dent"


@pytest.fixture
def outside(dataset, tmp_path):
    """A secret beside the dataset, and symlinks inside the dataset that lead to it."""
    ds, ids = dataset
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "secret.png").write_bytes(SECRET)
    (tmp_path / "secret.png").write_bytes(SECRET)
    os.symlink(secret_dir / "secret.png", ds / "images" / "ok" / "link.png")
    os.symlink(secret_dir, ds / "images" / "linkdir")
    os.symlink(secret_dir / "secret.png", ds / "inbox" / "zz.png")
    return ds


TRAVERSALS = [
    "/files/../secret.png",
    "/files/inbox/../../secret.png",
    "/files/images/ok/../../../secret.png",
    "/files/%2e%2e/secret.png",
    "/files/inbox/%2e%2e/%2e%2e/secret.png",
    "/files/inbox/%2E%2E%2F%2E%2E%2Fsecret.png",
    "/files/images%2f..%2f..%2fsecret.png",
    "/files/%252e%252e/secret.png",
    "/files/inbox/..%5c..%5csecret.png",
    "/files//etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/%2Ftmp%2Fsecret.png",
    "/files/images/ok/link.png",
    "/files/images/linkdir/secret.png",
    "/files/inbox/zz.png",
    "/files/inbox/x.png%00.json",
    "/files/manifest.csv",
    "/files/inbox",
    "/files/images/ok",
    "/../../../../etc/passwd",
    "/static/../../../etc/passwd",
    "/static/%2e%2e/server.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_outside_the_inbox_and_images_are_refused(server, outside, path):
    status, body = request(server, "GET", path)
    assert status in (403, 404), (path, status)
    assert SECRET not in body and b"root:" not in body


def test_sidecars_and_other_non_images_are_not_served(server, dataset):
    ds, ids = dataset
    (ds / "images" / "ok" / "notes.txt").write_text("x")
    for path in (f"/files/inbox/{ids[0]}.json", "/files/images/ok/notes.txt", "/files/.manifest.lock"):
        assert request(server, "GET", path)[0] == 403, path


def test_posts_need_the_token_and_every_request_a_local_host(server, dataset):
    ds, ids = dataset
    body = {"ids": [ids[0]], "label": "ok"}
    assert api(server, "/api/accept", body, token=None)[0] == 403
    assert api(server, "/api/accept", body, token="guess")[0] == 403
    # DNS rebinding: a page of evil.example whose name now points at 127.0.0.1
    assert api(server, "/api/accept", body, host="evil.example:8765")[0] == 403
    assert request(server, "GET", "/api/state", host="evil.example")[0] == 403
    assert request(server, "GET", "/", host="evil.example")[0] == 403
    assert request(server, "GET", "/api/state", host="localhost:1")[0] == 200
    assert request(server, "GET", "/api/state", host="[::1]:8765")[0] == 200
    status, body = request(server, "GET", "/api/state", host="line1-box:8765")
    assert status == 403 and b"--allow-host line1-box" in body  # the refusal says how to allow a real name
    assert len(list_inbox(ds)) == 4
    # malformed bodies
    assert api(server, "/api/accept", b"not json")[0] == 400
    assert api(server, "/api/accept", b"[1, 2]")[0] == 400
    assert request(server, "POST", "/api/nope", {})[0] == 404
    assert request(server, "DELETE", "/api/state")[0] == 405


def test_concurrent_accepts_lose_nothing_and_readers_always_see_a_whole_manifest(tmp_path):
    ds = tmp_path / "ds"
    write_manifest(ds, [add_image(ds, _image(1), "ok")])
    ids = _inbox(ds, ["ok"] * 24)
    srv = make_server(ds, port=0).start()
    errors: list[BaseException] = []
    results: list[int] = []
    stop = threading.Event()
    seen: list[int] = []

    def reader():
        while not stop.is_set():
            try:
                seen.append(len(read_manifest(ds)))
            except BaseException as exc:  # a half-written manifest would land here
                errors.append(exc)

    def worker(chunk: list[str]):
        for item_id in chunk:
            try:
                results.append(api(srv, "/api/accept", {"ids": [item_id], "label": "ok"})[0])
            except BaseException as exc:
                errors.append(exc)

    # every id twice, by different threads: one wins, the other gets 404
    chunks = [ids[i::6] for i in range(6)] + [ids[::-1][i::6] for i in range(6)]
    threads = [threading.Thread(target=reader)] + [threading.Thread(target=worker, args=(c,)) for c in chunks]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(timeout=120)
        stop.set()
        threads[0].join(timeout=30)
    finally:
        srv.close()
    assert not errors, errors[:3]
    assert sorted(results).count(200) == 24 and sorted(results).count(404) == 24
    rows = read_manifest(ds)
    assert len(rows) == 25
    assert sorted(s.extra["inbox_id"] for s in rows[1:]) == sorted(ids)
    assert all((ds / s.path).is_file() for s in rows)
    assert list_inbox(ds) == []
    assert seen and seen == sorted(seen)  # the row count only grows: each write replaced the file whole


def test_cli_prints_the_url_serves_and_stops_on_sigterm(dataset):
    ds, ids = dataset
    proc = subprocess.Popen([sys.executable, "-m", "visiond", "label", str(ds), "--port", "0", "--classes", "spot,dent"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", line)
            if m:
                url, port = m.group(1), int(m.group(2))
        assert url, proc.stderr.read() if proc.poll() is not None else "no URL printed"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/state")
        s = json.loads(conn.getresponse().read())
        assert s["classes"] == ["spot", "dent", "ok", "scratch"]
        assert len(s["items"]) == 4
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_cli_names_a_missing_dataset_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "visiond", "label", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_a_host_name_allowed_by_the_operator_opens_the_page_and_others_still_do_not(dataset):
    # given the page started with --allow-host for the box's name on the plant network
    srv = make_server(dataset[0], port=0, allow_hosts=["Line1-Box.plant.local."]).start()
    try:
        # then the page, the state and labelling work under that name (any case, any port)
        assert request(srv, "GET", "/", host="line1-box.plant.local:8765")[0] == 200
        assert request(srv, "GET", "/api/state", host="LINE1-BOX.plant.local")[0] == 200
        assert api(srv, "/api/accept", {"ids": [dataset[1][0]], "label": "ok"}, host="line1-box.plant.local:80")[0] == 200
        # and any other name is still refused
        assert request(srv, "GET", "/api/state", host="evil.example")[0] == 403
        assert request(srv, "GET", "/api/state", host="line1-box.plant.local.evil.example")[0] == 403
    finally:
        srv.close()
