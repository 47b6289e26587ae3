"""The labelling page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The test presses real keys and clicks real thumbnails, then checks the dataset on disk.
Set VISIOND_DOCS_SCREENSHOT=1 to also refresh docs/label-page.png for the README.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import cv2
import pytest

from conftest import ROOT, require_binary
from tools import synthline
from visiond.data.inbox import list_inbox, prediction_dict, write_inbox_item
from visiond.data.manifest import add_image, read_manifest, write_manifest
from visiond.label.server import make_server

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000  # two shared cores: be patient, never sleep

# (true class, the model's guess) for six captured frames, oldest first
INBOX = [("ok", "scratch"), ("spot", "spot"), ("scratch", "scratch"), ("scratch", "ok"), ("scratch", "scratch"),
         ("empty", "empty")]


@pytest.fixture
def dataset(tmp_path):
    """Two labelled crops per class of the synthetic line, and six more waiting in the inbox."""
    src = tmp_path / "src"
    synthline.render_images(src, per_class=5, seed=3, size=64)
    ds = tmp_path / "ds"
    rows, spare = [], {}
    for cls in synthline.CLASSES:
        files = sorted((src / cls).glob("*.png"))
        rows += [add_image(ds, cv2.imread(str(f)), cls, split="train") for f in files[:2]]
        spare[cls] = [cv2.imread(str(f)) for f in files[2:]]
    write_manifest(ds, rows)
    ids = []
    for i, (truth, guess) in enumerate(INBOX):
        top = [(guess, 0.55 + i / 100), (truth if truth != guess else "ok", 0.3)]
        item = write_inbox_item(ds, spare[truth].pop(0), {
            "camera": "line1", "captured_at": 1_717_000_000 + 7 * i, "rule": "low_score",
            "prediction": prediction_dict(guess, top[0][1], top, "smallcnn", "3f2a9c1d")})
        ids.append(item.id)
    return ds, ids


@pytest.fixture
def open_page(tmp_path):
    """open_page(dataset_dir) -> a Chromium page on a fresh server for that dataset."""
    from playwright import sync_api  # a test dependency (pyproject [test]); missing = a broken setup, not a skip
    chromium = require_binary("chromium", "chromium")
    sync_api.expect.set_options(timeout=WAIT_MS)
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        pw = stack.enter_context(sync_api.sync_playwright())

        def open_page(ds: Path):
            srv = make_server(ds, port=0).start()
            stack.callback(srv.close)
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 800})
            stack.callback(ctx.close)
            pg = ctx.pages[0] if ctx.pages else ctx.new_page()
            pg.set_default_timeout(WAIT_MS)
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            pg.goto(srv.url)
            return pg

        yield open_page
    assert not errors, errors


@pytest.fixture
def page(open_page, dataset):
    return open_page(dataset[0])


def _rows(ds: Path) -> dict[str, str]:
    """inbox id -> label, for the rows the page added."""
    return {s.extra["inbox_id"]: s.label for s in read_manifest(ds) if s.extra.get("inbox_id")}


def _in_inbox(ds: Path) -> list[str]:
    return [i.id for i in list_inbox(ds)]


def test_label_the_inbox_with_keys_and_the_grid(page, dataset, tmp_path):
    from playwright.sync_api import expect

    ds, ids = dataset
    progress, image, selected = page.locator("#progress"), page.locator("#image"), page.locator("button.cls.selected")
    # given the page: classes empty, ok, scratch, spot on keys 1-4; the first frame is large and crisp
    expect(progress).to_have_text("0 / 6 labelled, 6 left")
    expect(image).to_have_attribute("data-id", ids[0])
    expect(page.locator("button.cls")).to_have_text([re.compile(rf"^{i + 1}\s+{c}") for i, c in
                                                       enumerate(synthline.CLASSES)])
    expect(image).to_have_js_property("naturalWidth", 64)
    expect(image).to_have_attribute("style", re.compile(r"width: \d{3,}px"))  # fitted after loading
    assert image.bounding_box()["width"] >= 4 * 64  # scaled up, whole pixels
    expect(image).to_have_css("image-rendering", "pixelated")
    expect(page.locator("#guess")).to_contain_text("model: scratch 0.55")
    expect(page.locator("#meta")).to_contain_text("camera line1")
    # the model's guess is pre-selected
    expect(selected).to_have_attribute("data-class", "scratch")
    expect(page.locator("button.cls.guess")).to_have_attribute("data-class", "scratch")
    page.screenshot(path=str(tmp_path / "label-page.png"))
    if os.environ.get("VISIOND_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "docs" / "label-page.png"))

    # when 2 then Enter: the first frame goes into "ok", not the model's guess
    page.keyboard.press("2")
    expect(selected).to_have_attribute("data-class", "ok")
    page.keyboard.press("Enter")
    expect(progress).to_have_text("1 / 6 labelled, 5 left")
    assert _rows(ds) == {ids[0]: "ok"}
    assert (ds / read_manifest(ds)[-1].path).parent == ds / "images" / "ok"
    assert ids[0] not in _in_inbox(ds)

    # Enter alone accepts the next frame's pre-selected guess (spot)
    expect(image).to_have_attribute("data-id", ids[1])
    expect(selected).to_have_attribute("data-class", "spot")
    page.keyboard.press("Enter")
    expect(progress).to_have_text("2 / 6 labelled, 4 left")
    assert _rows(ds) == {ids[0]: "ok", ids[1]: "spot"}

    # Backspace undoes it: back in the inbox, out of the manifest, shown again
    page.keyboard.press("Backspace")
    expect(progress).to_have_text("1 / 6 labelled, 5 left")
    expect(image).to_have_attribute("data-id", ids[1])
    assert _rows(ds) == {ids[0]: "ok"}
    assert ids[1] in _in_inbox(ds)

    # s skips it: still in the inbox, the next frame is shown
    page.keyboard.press("s")
    expect(image).to_have_attribute("data-id", ids[2])
    expect(progress).to_have_text("1 / 6 labelled, 5 left")
    assert ids[1] in _in_inbox(ds)

    # grid mode: click one thumbnail, shift-click another, one click on a class labels all three
    page.keyboard.press("g")
    thumbs = page.locator("#thumbs .thumb")
    expect(thumbs).to_have_count(5)
    expect(thumbs.first).to_have_attribute("data-id", ids[2])
    expect(thumbs.last).to_have_attribute("data-id", ids[1])  # skipped: last
    thumbs.nth(0).click()
    thumbs.nth(2).click(modifiers=["Shift"])
    expect(page.locator("#thumbs .thumb.picked")).to_have_count(3)
    expect(page.locator("#grid-count")).to_contain_text("3 selected")
    page.screenshot(path=str(tmp_path / "label-grid.png"))
    page.locator("button.cls[data-class=scratch]").click()
    expect(progress).to_have_text("4 / 6 labelled, 2 left")
    assert _rows(ds) == {ids[0]: "ok", ids[2]: "scratch", ids[3]: "scratch", ids[4]: "scratch"}
    assert all((ds / s.path).parent.name == s.label for s in read_manifest(ds))

    # and a number key labels the selection too: the last frame is empty belt
    expect(thumbs).to_have_count(2)
    page.locator(f"#thumbs .thumb[data-id='{ids[5]}']").click()
    page.keyboard.press("1")
    expect(progress).to_have_text("5 / 6 labelled, 1 left")
    assert _rows(ds)[ids[5]] == "empty"
    assert _in_inbox(ds) == [ids[1]]

    # x discards the frame nobody should learn from: out of the inbox, set aside, not in the manifest
    page.keyboard.press("g")
    expect(image).to_have_attribute("data-id", ids[1])
    page.keyboard.press("x")
    expect(progress).to_have_text("5 / 6 labelled, 0 left, 1 discarded")
    expect(page.locator("#empty")).to_be_visible()
    assert _in_inbox(ds) == [] and (ds / "discarded" / f"{ids[1]}.png").is_file()
    assert ids[1] not in _rows(ds)
    # and Backspace brings it back
    page.keyboard.press("Backspace")
    expect(progress).to_have_text("5 / 6 labelled, 1 left")
    expect(image).to_have_attribute("data-id", ids[1])
    assert _in_inbox(ds) == [ids[1]] and not (ds / "discarded" / f"{ids[1]}.png").exists()
    page.screenshot(path=str(tmp_path / "label-done.png"))
    assert (tmp_path / "label-page.png").stat().st_size > 10_000


def test_an_empty_inbox_says_so_and_a_new_class_can_be_added(open_page, tmp_path):
    from playwright.sync_api import expect

    # given a fresh dataset: no manifest, nothing captured yet
    ds = tmp_path / "fresh"
    ds.mkdir()
    page = open_page(ds)
    expect(page.locator("#progress")).to_have_text("0 / 0 labelled, 0 left")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#message")).to_contain_text("No classes yet")
    # when a class is typed in (keys typed there are text, not shortcuts) and a frame arrives
    page.locator("#new-class").fill("dent")
    page.locator("#new-class").press("s")
    page.locator("#new-class").press("Backspace")
    page.locator("#new-class").press("Enter")
    expect(page.locator("button.cls")).to_have_text([re.compile(r"1\s+dent")])
    write_inbox_item(ds, cv2.imread(str(_line_crops(tmp_path)[0])), {"camera": "line2", "prediction": None})
    # then the page picks it up on its own, with no class pre-selected, and 1 + Enter labels it
    expect(page.locator("#progress")).to_have_text("0 / 1 labelled, 1 left")
    expect(page.locator("button.cls.selected")).to_have_count(0)
    expect(page.locator("#guess")).to_have_text("model: no guess")
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("Choose a class first")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("1 / 1 labelled, 0 left")
    assert [s.label for s in read_manifest(ds)] == ["dent"]


def _line_crops(tmp_path: Path) -> list[Path]:
    synthline.render_images(tmp_path / "crops", per_class=1, seed=5, size=64)
    return sorted((tmp_path / "crops").rglob("*.png"))
