"""The /playground page in headless Chromium (the Debian package, driven by Playwright): typing a key and a
prompt brings images over the realtime socket, drawn on the canvas; a wrong key, a model without workers
and a failed frame are said on the page at once; switching models draws the new one at once."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.api_stack import IDLE_MODEL, TINY, ApiStack
from tests.chromium import wait_for
from tests.node import node_project

BUNDLE = Path(__file__).parents[1] / "farm" / "api" / "static" / "fal-client.js"
LOCK = Path(__file__).parent / "js" / "package-lock.json"


def test_bundle_is_the_locked_client(tmp_path: Path) -> None:
    """The served bundle is @fal-ai/client as tests/js locks it: its banner names the locked version, and
    the build script (npm run build:playground), run again on the locked packages (npm ci), writes the
    same bytes (esbuild's output is deterministic: a stale or edited bundle differs)."""
    locked = json.loads(LOCK.read_text())["packages"]["node_modules/@fal-ai/client"]["version"]
    banner = BUNDLE.read_text().splitlines()[0]
    assert re.search(rf"@fal-ai/client {re.escape(locked)}\b", banner), (locked, banner)

    js = node_project()
    script = json.loads((js / "package.json").read_text())["scripts"]["build:playground"]
    tool, *args = shlex.split(script)
    assert tool == "esbuild" and sum(a.startswith("--outfile=") for a in args) == 1, script
    rebuilt = tmp_path / "fal-client.js"
    args = [f"--outfile={rebuilt}" if a.startswith("--outfile=") else a for a in args]
    done = subprocess.run([str(js / "node_modules" / ".bin" / tool), *args], cwd=js, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rebuilt.read_bytes() == BUNDLE.read_bytes(), "farm/api/static/fal-client.js is not the build of the " \
        "locked packages: cd tests/js && npm ci && npm run build:playground"


MODELS_LOADED = "() => document.querySelector('#model').options.length > 0"
FRAMES = "() => Number(document.querySelector('#image').dataset.frames)"


@contextmanager
def _page(browser: Any, url: str) -> Iterator[tuple[Any, list[str]]]:
    context = browser.new_context(ignore_https_errors=True)  # the test CA is not in Chromium's store
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        page.goto(url, timeout=30000)
        wait_for(page, MODELS_LOADED, console=console)
        yield page, console
    finally:
        context.close()


def _options(page: Any) -> dict[str, dict[str, str]]:
    return {o["value"]: o for o in page.evaluate(
        "() => [...document.querySelectorAll('#model option')].map(o => ({value: o.value, text: o.textContent,"
        " live: o.dataset.live, cls: o.className}))")}  # fmt: skip


def test_playground_draws_images_as_you_type(api_stack: ApiStack, browser: Any) -> None:
    """No model asked for: the page lists the models, marks those without workers, picks one that has
    workers (the tiny model here) at its default size, and draws as you type; a bad frame is said."""
    key = api_stack.make_key("playground")
    with _page(browser, f"{api_stack.base_url}/playground?steps=2&seed=7") as (page, console):
        options = _options(page)
        assert page.input_value("#model") == TINY, options  # the one model with a live worker
        assert page.input_value("#size") == "64", options  # its default size
        assert int(options[TINY]["live"]) >= 1 and "live worker" in options[TINY]["text"], options
        assert options[IDLE_MODEL]["live"] == "0" and "no live worker" in options[IDLE_MODEL]["text"], options
        assert options[IDLE_MODEL]["cls"] == "dead", options
        assert page.text_content("#model-note") == "", "the chosen model has workers: no note"
        assert page.eval_on_selector("#image", "c => c.dataset.frames") == "0"
        page.fill("#key", key)  # the first input connects (token from POST /tokens/) and sends a frame
        wait_for(page, f"() => ({FRAMES})() >= 1", console=console)
        page.fill("#prompt", "a red fox in snow")  # typing sends again: the image follows
        newer = (f"() => ({FRAMES})() >= 2 && document.querySelector('#image').dataset.requestId !== "
                 "'playground-1'")  # fmt: skip
        wait_for(page, newer, console=console)
        drawn = page.evaluate(
            """() => {
                const c = document.querySelector('#image');
                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let opaque = 0, distinct = new Set();
                for (let i = 0; i < px.length; i += 4) {
                    if (px[i + 3] > 0) opaque++;
                    distinct.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
                }
                return {w: c.width, h: c.height, opaque, colours: distinct.size,
                        status: document.querySelector('#status').textContent,
                        error: document.querySelector('#status').className};
            }"""
        )
        page.fill("#size", "4096")  # past FARM_MAX_IMAGE_SIDE: the frame fails, and the page says why
        wait_for(page, "() => document.querySelector('#status').className === 'error'", console=console)
        failed = page.text_content("#status") or ""
    assert (drawn["w"], drawn["h"]) == (64, 64), (drawn, console)
    assert drawn["opaque"] == 64 * 64 and drawn["colours"] > 16, (drawn, console)  # an image, not a blank
    assert drawn["error"] == "" and "seed 7" in drawn["status"], (drawn, console)
    assert "invalid_input" in failed and "image_size" in failed, failed
    # fal's client warns neither about a deprecated default token provider nor about exposed credentials
    assert not [line for line in console if "deprecated" in line.lower() or "credentials" in line.lower()], console


def test_playground_says_a_wrong_key_at_once(api_stack: ApiStack, browser: Any) -> None:
    with _page(browser, f"{api_stack.base_url}/playground?steps=2") as (page, console):
        page.fill("#key", "nobody:not-a-secret")
        wait_for(page, "() => document.querySelector('#status').className === 'error'", console=console)
        shown = page.text_content("#status") or ""
        frames = page.evaluate(FRAMES)
    assert "key was refused (401)" in shown and "invalid or revoked API key" in shown, (shown, console)
    assert frames == 0


def test_switching_from_a_model_without_workers_draws_at_once(api_stack: ApiStack, browser: Any) -> None:
    """Frames of a model nobody serves are outstanding (the API stack waits 60 s for a frame's worker);
    switching to the live model draws its image before any of them is answered: they do not delay it."""
    import redis

    from farm.realtime.lane import lane_key
    from models.registry import get_model

    key = api_stack.make_key("playground-switch")
    lane = lane_key(get_model(IDLE_MODEL).key)
    broker = redis.Redis.from_url(api_stack.env["FARM_BROKER_URL"])
    try:
        broker.delete(lane)
        with _page(browser, f"{api_stack.base_url}/playground?model={IDLE_MODEL}&steps=2&seed=3") as (page, console):
            assert page.input_value("#model") == IDLE_MODEL  # asked for by name: kept, and marked at once
            note = page.text_content("#model-note") or ""
            assert f"no live worker serves {IDLE_MODEL}" in note and "farm worker --model" in note, note
            assert page.input_value("#size") == "512"  # SD1.5's default size
            page.fill("#key", key)  # sends a frame for the model nobody serves
            for n in range(40):  # bounded: until it waits at the model's lane (the API sent it on)
                if broker.llen(lane) >= 1:
                    break
                page.fill("#prompt", f"a lighthouse, take {n}")
                page.wait_for_timeout(250)
            assert broker.llen(lane) >= 1, console
            page.select_option("#model", TINY)
            assert page.input_value("#size") == "64"  # the new model's default size
            assert page.text_content("#model-note") == ""
            wait_for(page, f"() => ({FRAMES})() >= 1", timeout=120, console=console)
            events = page.evaluate("() => window.playgroundEvents.map(e => ({...e}))")
            drawn_model = page.eval_on_selector("#image", "c => c.dataset.model")
            width = page.eval_on_selector("#image", "c => c.width")
    finally:
        broker.delete(lane)
        broker.close()
    assert drawn_model == TINY and width == 64, (drawn_model, width, events)
    first = next(i for i, e in enumerate(events) if e["kind"] == "result")
    assert events[first]["model"] == TINY, events
    dead_sent = [e for e in events[:first] if e["kind"] == "sent" and e["model"] == IDLE_MODEL]
    answered = [e for e in events[:first] if e["kind"] != "sent"]
    assert dead_sent and answered == [], events  # drawn while every frame of the dead model was outstanding


PIXELS = """(id) => {
    const c = document.querySelector(id);
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let dark = 0, distinct = new Set();
    for (let i = 0; i < px.length; i += 4) {
        if (px[i] < 128) dark++;
        distinct.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
    }
    return {w: c.width, h: c.height, dark, colours: distinct.size};
}"""


def test_sketch_mode_draws_the_image_from_your_strokes(api_stack: ApiStack, browser: Any) -> None:
    """Sketch mode: strokes drawn with the mouse on the sketch canvas go, as PNG bytes, through fal.realtime to
    ``…/image-to-image`` (fal's sketch demo); the image that comes back is drawn. No job row is written."""
    key = api_stack.make_key("playground-sketch")
    with _page(browser, f"{api_stack.base_url}/playground?steps=2&seed=9") as (page, console):
        page.select_option("#mode", "sketch")
        assert page.is_visible("#sketch") and page.is_visible("#strength")
        blank = page.evaluate(PIXELS, "#sketch")
        assert (blank["w"], blank["h"]) == (64, 64) and blank["dark"] == 0, blank  # the tiny model's size, white
        assert page.evaluate(PIXELS, "#image")["colours"] == 1  # nothing drawn yet
        page.fill("#key", key)
        for stroke in range(3):  # strokes with the mouse, across the canvas
            page.locator("#sketch").scroll_into_view_if_needed()  # the mouse acts inside the viewport only
            box = page.locator("#sketch").bounding_box()
            assert box is not None
            y = box["y"] + box["height"] * (0.25 + 0.25 * stroke)
            page.mouse.move(box["x"] + 20, y)
            page.mouse.down()
            for step in range(1, 9):
                page.mouse.move(box["x"] + 20 + (box["width"] - 40) * step / 8, y + 10 * (step % 2))
            page.mouse.up()
        wait_for(page, f"() => ({FRAMES})() >= 1", console=console)
        sketched = page.evaluate(PIXELS, "#sketch")
        strokes = page.eval_on_selector("#sketch", "c => c.dataset.strokes")
        drawn = page.evaluate(PIXELS, "#image")
        events = page.evaluate("() => window.playgroundEvents.map(e => ({...e}))")
        shown = page.text_content("#status") or ""
    assert strokes == "3" and sketched["dark"] > 50, sketched  # the strokes are on the sketch
    assert (drawn["w"], drawn["h"]) == (64, 64) and drawn["colours"] > 16, (drawn, console)  # an image came
    assert "seed 9" in shown, (shown, console)
    sent = [e for e in events if e["kind"] == "sent"]
    assert sent and all(e["mode"] == "sketch" for e in sent), events
    assert any(e["kind"] == "result" for e in events) and not any(e["kind"] == "error" for e in events), events
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'playground-sketch'") == [(0,)]
