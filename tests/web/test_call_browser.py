"""The call in real browsers: `telepresence serve` (fake pipeline: the real one is too slow for two
participants on the 2-core CI machine) and headless Chromium pages whose cameras are Chromium's fake
camera playing a clip the test makes (tests/fake_camera.py)."""

import base64
import importlib.util
import re
import shutil
import time

import numpy as np
import pytest

from tests.fake_camera import head_moving_frames, sample_frames, turn_pictures, write_y4m
from tests.web.test_browser import CHROMIUM, CHROMIUM_FLAGS, Process

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FPS = 12
CAMERA_FLAGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
FAKE = "tests.fake_pipeline:build_pipeline"

# What the page's <video> of the tile named NAME shows, 64 x 64 RGB.
GRAB_TILE_JS = """(name) => {
  const tile = [...document.querySelectorAll('.tile')].find(t => t.querySelector('.name').textContent === name);
  if (!tile) return null;
  const side = 64, canvas = document.createElement('canvas');
  canvas.width = side; canvas.height = side;
  const g = canvas.getContext('2d');
  g.drawImage(tile.querySelector('video'), 0, 0, side, side);
  const data = g.getImageData(0, 0, side, side).data;
  let text = '';
  for (let i = 0; i < data.length; i++) text += String.fromCharCode(data[i]);
  return btoa(text);  // one string: a list of numbers crosses to Python one boxed value at a time
}"""
COUNT_CAMERA_JS = """() => {
  window.cameraStarts = 0;
  const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = (constraints) => { window.cameraStarts += 1; return open(constraints); };
}"""
LIVE_TILE_JS = """(name) => [...document.querySelectorAll('.tile')].some(t => t.querySelector('.name').textContent === name
  && t.dataset.state === 'live' && t.querySelector('video').currentTime > 0.3)"""


@pytest.fixture
def browsers():
    """launch(clip) -> a new page in its own Chromium whose fake camera plays `clip`; all closed after."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (what .ci/run does), or set $CHROMIUM")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("the playwright package is not installed: `make install` installs the test extra")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        opened, errors = [], []

        def launch(clip):
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=CHROMIUM_FLAGS + CAMERA_FLAGS + [f"--use-file-for-fake-video-capture={clip}"])
            opened.append(browser)
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.add_init_script(f"({COUNT_CAMERA_JS})()")
            return page

        yield launch
        for browser in opened:
            browser.close()
        assert not errors, errors


def start_server(*extra):
    server = Process("-m", "telepresence.cli", "serve", "--port", "0", "--pipeline", FAKE, *extra)
    url = server.read_until(r"Open (http://\S+)", timeout_s=60).group(1)
    return server, url, int(re.search(r":(\d+)/", url).group(1))


def join(page, url, name, head="on"):
    page.goto(f"{url}&name={name}&head={head}")
    assert "never goes to the others" in page.text_content("#privacy")  # said before the camera starts
    assert page.evaluate("window.cameraStarts") == 0 and page.evaluate("document.body.dataset.call") == "lobby"
    room = re.search(r"[?&]room=([^&]+)", url).group(1)
    assert page.text_content("#room-name") == page.text_content("#lobby-room") == room  # the header too, before joining
    assert page.title().startswith(room)
    page.click("#join")
    page.wait_for_function("() => document.body.dataset.call === 'in-call'", timeout=30000)
    assert page.evaluate("window.cameraStarts") == 1


def grab(page, name):
    data = page.evaluate(GRAB_TILE_JS, name)
    assert data is not None, f"no tile named {name}"
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(64, 64, 4)[..., :3].astype(np.float32)


def gray64(rgb):
    import cv2

    return cv2.resize(rgb.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA).mean(axis=2)


def correlation(a, b, mask):
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))


def marker_x(rgb):
    """Where the fake pipeline's red pose marker is, -1 (left edge) .. 1 (right edge); None if not seen."""
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    if red.sum() < 4:
        return None
    return float((np.nonzero(red)[1].mean() + 0.5) / 32.0 - 1.0)


def test_joining_a_room_the_server_refuses_ends_with_the_reason(browsers, tmp_path):
    clip = tmp_path / "still.y4m"
    write_y4m(clip, sample_frames(128, step=10), FPS)
    server, url, port = start_server()
    try:
        page = browsers(clip)
        page.goto(f"http://127.0.0.1:{port}/call?room=bad%20room&name=ann")
        page.click("#join")
        page.wait_for_function("() => document.body.dataset.call === 'ended'", timeout=15000)
        said = page.text_content("#lobby-message")
        assert said.startswith("Cannot join: room: expected 1-64 letters") and "'bad room'" in said, said
        assert page.evaluate("!!document.querySelector('#self-video').srcObject") is False  # the camera is off again
    finally:
        server.stop()



def test_who_gives_no_name_gets_one_of_their_own_that_the_server_takes(browsers, tmp_path):
    from telepresence.stream.messages import JoinMessage

    clip = tmp_path / "still.y4m"
    write_y4m(clip, sample_frames(128, step=10), FPS)
    server, url, port = start_server()
    try:
        names = []
        for page in (browsers(clip), browsers(clip)):
            page.goto(url)  # no &name=, nothing remembered
            assert page.input_value("#name") == ""
            name = page.evaluate("window.telepresence.joinName()")
            assert re.fullmatch(r"guest-[0-9a-f]{4}", name), name
            assert page.evaluate("window.telepresence.joinName()") == name  # the same on every (re)join
            assert page.get_attribute("#name", "placeholder") == name  # the lobby shows it
            JoinMessage(room="demo", role="viewer", name=name)  # within the server's rule for names
            names.append(name)
        assert names[0] != names[1]  # (one chance in 65536 that two pages draw the same)
    finally:
        server.stop()

def test_two_pages_see_each_others_avatar_turn_and_leave(browsers, tmp_path):
    alice_clip = write_y4m(tmp_path / "sample.y4m", sample_frames(), FPS)
    first, last = turn_pictures()
    bob_clip = write_y4m(tmp_path / "turn.y4m", [first] * 2 * FPS + [last] * 2 * FPS, FPS)  # turns every 2 s
    server, url, _ = start_server()
    try:
        alice, bob = browsers(alice_clip), browsers(bob_clip)
        join(alice, url, "alice", head="off")  # head tracking off: the views stay at the orbit's rest
        join(bob, url, "bob", head="off")
        # The join is shown (a toast lives a few seconds: looked for as it comes, not after the tiles are live,
        # which a loaded machine took longer than that to see)
        alice.wait_for_function("() => document.querySelector('#toasts').textContent.includes('bob joined')",
                                timeout=10000)
        alice.wait_for_function(LIVE_TILE_JS, arg="bob", timeout=20000)
        bob.wait_for_function(LIVE_TILE_JS, arg="alice", timeout=20000)
        assert alice.locator(".tile").count() == 1 and bob.locator(".tile").count() == 1  # not one's own avatar
        # The server asks each camera for no more frames than its pipeline uses, and the page's sender applies it.
        alice.wait_for_function("() => window.telepresence.uplink?.frameRate > 0", timeout=20000)
        applied = alice.evaluate("""() => window.telepresence.uplink.pc.getSenders()
          .find((s) => s.track?.kind === 'video').getParameters().encodings[0].maxFramerate""")
        assert applied == alice.evaluate("window.telepresence.uplink.frameRate")
        server.read_until(r"\(alice\): asking its camera for at most \d+ frames a second", timeout_s=20)

        # Each page receives the other's avatar: with the fake pipeline, the other's camera picture
        # resized, the pose marker at its centre (left out of the comparison).
        yy, xx = np.mgrid[0:64, 0:64]
        mask = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 9.0 ** 2
        samples = [gray64(frame) for frame in sample_frames(step=8)]
        seen_by_bob = gray64(grab(bob, "alice"))
        assert max(correlation(seen_by_bob, s, mask) for s in samples) > 0.8
        # ... and when bob's clip turns his head, what alice receives turns with it
        turned = [gray64(first), gray64(last)]
        matches = []
        for _ in range(24):
            picture = gray64(grab(alice, "bob"))
            scores = [correlation(picture, t, mask) for t in turned]
            assert max(scores) > 0.8, scores
            matches.append(int(np.argmax(scores)))
            time.sleep(0.25)
        assert 0 < sum(matches) < len(matches), matches  # both ways within 6 s of a clip that turns every 2 s

        # the viewer's badge and stats panel, on the call page too: S opens the panel, the server stamps
        # alice's frames of bob only then, and alice measures glass to glass from them
        badge = alice.locator(".tile .badge")
        assert alice.text_content('.tile [data-badge="refiner"]') == "refiner off"  # the fake pipeline
        assert alice.text_content(".tile .size-note") == "256 px · CPU"
        alice.keyboard.press("s")
        assert alice.locator("#stats-panel").is_visible() and badge.get_attribute("aria-expanded") == "true"
        assert alice.text_content(".tile-stats-name") == "bob"
        alice.wait_for_function("() => /^\\d+$/.test(document.querySelector('[data-badge=\"latency\"]').textContent)",
                                timeout=10000)
        panel, self_view = alice.locator("#stats-panel").bounding_box(), alice.locator("#self").bounding_box()
        assert self_view["x"] + self_view["width"] <= panel["x"], (self_view, panel)  # the self view moves clear of it
        # The panel's memory reset reaches bob's pipeline in its own process (the fake's fill: 1 % a frame)
        fill = "() => Number(document.querySelector('#stats-panel [data-stat=\"memory\"]').textContent)"
        alice.wait_for_function(f"() => ({fill})() >= 60", timeout=20000)
        alice.click("#stats-panel .memory-reset")
        alice.wait_for_function(f"() => ({fill})() < 30", timeout=5000)
        server.read_until(r"asked to reset the appearance memory$", timeout_s=5)
        alice.keyboard.press("s")
        assert not alice.locator("#stats-panel").is_visible()

        # bob leaves: his camera stops, alice is told and his tile goes, the server frees him
        bob.click("#leave")
        bob.wait_for_function("() => document.body.dataset.call === 'ended'", timeout=5000)
        assert bob.evaluate("document.querySelector('#self-video').srcObject === null")
        alice.wait_for_function("() => document.querySelector('#toasts').textContent.includes('bob left')", timeout=5000)
        alice.wait_for_function("() => document.querySelectorAll('.tile').length === 0", timeout=10000)
        server.read_until(r"\(bob\): left the call \(left the call\)", timeout_s=10)
    finally:
        server.stop()


def test_head_tracking_turns_each_watchers_view_the_way_their_head_moved(browsers, tmp_path):
    # The watcher moving to their own left is the head moving to the right of their (unmirrored) camera
    # picture; through a window they then see more of the other's right cheek: yaw < 0, which the fake
    # pipeline draws as its pose marker left of centre. The other person is a Python sender ("carol").
    left = write_y4m(tmp_path / "left.y4m", head_moving_frames(+0.5, FPS), FPS)
    right = write_y4m(tmp_path / "right.y4m", head_moving_frames(-0.5, FPS), FPS)
    server, url, port = start_server()
    sender = Process("run_sender.py", "--signaling", f"ws://127.0.0.1:{port}/ws", "--source", "sample",
                     "--pipeline", FAKE, "--name", "carol")
    try:
        sender.read_until(r"joined room 'demo'", timeout_s=60)
        watchers = {"moved left": browsers(left), "moved right": browsers(right)}
        for name, page in watchers.items():
            join(page, url, name.replace(" ", "-"))
        for page in watchers.values():
            page.wait_for_function(LIVE_TILE_JS, arg="carol", timeout=20000)

        def settled_marker(page):
            time.sleep(1.5)  # the clip's head has moved (0.5 s) and the One-Euro filter has followed
            xs = [marker_x(grab(page, "carol")) for _ in range(8) if not time.sleep(0.1)]
            xs = [x for x in xs if x is not None]
            assert len(xs) >= 5, xs
            return float(np.median(xs))

        x_left, x_right = settled_marker(watchers["moved left"]), settled_marker(watchers["moved right"])
        print(f"pose marker of carol: {x_left:+.2f} for the watcher who moved left, {x_right:+.2f} for the other")
        assert x_left < -0.1 and x_right > 0.1, (x_left, x_right)
        yaw = watchers["moved left"].text_content('.tile [data-pose="yaw"]')
        assert yaw.startswith("-"), yaw

        # the toggle: head tracking off, the view goes back to the orbit's rest (yaw 0)
        watchers["moved left"].click("#head-toggle")
        assert abs(settled_marker(watchers["moved left"])) < 0.06
    finally:
        sender.stop()
        server.stop()
