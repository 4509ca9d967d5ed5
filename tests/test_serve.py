"""The live server end to end: websocket clients against a tiny caption model (the frames they receive are the stream
engine's, a caption switch lands at the frame it announced, pause, resume and branch), malformed messages and
uploads, the token, 200 streams opened and closed, a slow viewer beside a fast one, SIGTERM mid-stream, and a real
browser (headless Chromium) driving the page."""

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import causalvdm
from causalvdm import CausalVDMPipeline
from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.data.video_io import iter_video_frames
from causalvdm.diffusion import IDDPM
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import TEXT_ENCODERS, VAES, build
from causalvdm.sampling.settings import SampleSettings
from causalvdm.serving.server import Limits, LiveServer
from causalvdm.utils.memory import proc_status_mb
from conftest import ROOT

CAPTIONS = ["a red square drifts left", "a blue circle grows"]
SIZE = 8  # frames 8x8, PixelVAE factor 2: 4x4 latents


def make_pipe() -> CausalVDMPipeline:
    """A tiny caption-conditioned pipeline with random weights: WordHashEncoder, PixelVAE, chunks of 2, DDIM 2."""
    model_cfg = dict(load_config(ROOT / "configs" / "debug" / "tiny.py").model, in_channels=12, max_tpe_len=9)
    model = randomize_weights(causalvdm.build_model(model_cfg), seed=0, scale=0.3).eval()
    vae = build(VAES, dict(type="PixelVAE", factor=2), "vae")
    text = build(TEXT_ENCODERS, dict(type="WordHashEncoder", output_dim=16, model_max_length=6), "text_encoder")
    return CausalVDMPipeline(model, vae, IDDPM(), text, AutoregressiveSettings(chunk_size=2, max_cond_frames=4),
                             SampleSettings(sampler="ddim", num_steps=2, fps=8, dtype="float32"),
                             image_size=(SIZE, SIZE))


CLIP = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8)


def serve(pipe, **kwargs) -> LiveServer:
    return LiveServer(pipe, pipe.stream_engine(max_rows=kwargs.pop("max_rows", 6)), [("clip", CLIP)], CAPTIONS,
                      **kwargs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


class Viewer:
    """A websocket client: sends JSON, collects frames {stream: {index: frame uint8}} and messages."""

    def __init__(self, ws):
        self.ws, self.frames, self.messages = ws, {}, []

    async def send(self, **message):
        await self.ws.send_json(message)

    async def until(self, test, what: str):
        """Read messages until test(self) holds."""
        while not test(self):
            msg = await self.ws.receive()
            if msg.type == WSMsgType.BINARY:
                sid, index = struct.unpack(">II", msg.data[:8])
                self.frames.setdefault(sid, {})[index] = np.asarray(Image.open(io.BytesIO(msg.data[8:])))
            elif msg.type == WSMsgType.TEXT:
                self.messages.append(json.loads(msg.data))
            else:
                raise AssertionError(f"socket closed while waiting for {what}: {msg}")

    def last(self, kind: str) -> dict:
        return next(m for m in reversed(self.messages) if m["type"] == kind)


def test_viewer_gets_the_models_frames_switch_pause_branch(tmp_path):
    """The frames a viewer receives are those pipe() makes alone from the same frame, caption, seed and switch (to
    one uint8 step: the engine batches streams, so its floats differ from a lone run's by round-off), the switch
    lands at the frame the server announced, a paused stream takes no tick, a branch makes what its source makes."""
    pipe = make_pipe()

    async def scenario():
        server = serve(pipe)
        async with TestClient(TestServer(server.app)) as client:
            viewer = Viewer(await client.ws_connect("/ws"))
            await viewer.send(type="start", clip=0, frame=0, caption=CAPTIONS[0], seed=5)
            await viewer.until(lambda v: len(v.frames.get(0, {})) >= 4, "4 frames")
            await viewer.send(type="switch", caption=CAPTIONS[1], recache=True)
            await viewer.until(lambda v: any(m["type"] == "switching" for m in v.messages), "switching")
            at = viewer.last("switching")["at"]
            await viewer.until(lambda v: len(v.frames[0]) >= at + 4, "frames past the switch")
            await viewer.send(type="pause")
            await viewer.until(lambda v: any(m["type"] == "paused" for m in v.messages), "paused")
            paused_at = len(viewer.frames[0])
            ticks = server.ticks
            await asyncio.sleep(0.3)
            assert server.ticks == ticks and len(viewer.frames[0]) <= paused_at + 2  # a chunk in flight may land
            await viewer.send(type="resume")
            await viewer.send(type="branch", seed=5)
            await viewer.until(lambda v: len(v.frames.get(1, {})) >= 4, "the branch's frames")
            branch = viewer.last("started")
            status = await (await client.get("/status")).json()
            url = next(m["download"] for m in viewer.messages if m["type"] == "started" and m["stream"] == 0)
            download = await client.get(url)
            video = (tmp_path / "so_far.mp4")
            video.write_bytes(await download.read())
            refused = [(await client.get(path)).status for path in ("/download/7", "/download/0",
                                                                    "/download/0?key=guess", url.replace("/0?", "/1?"))]
            await viewer.ws.close()
            return viewer.frames, at, branch, status, viewer.last("chunk"), download.content_type, refused

    frames, at, branch, status, chunk, content_type, refused = run(scenario())
    assert status["streams"] == 2 and branch["branch_of"] == 0
    assert set(chunk["drift"]) == {"mean", "std", "sharpness", "change", "token_grid", "out_of_band"}
    assert content_type == "video/mp4" and refused == [404] * 4  # only with the stream's own key
    assert len(list(iter_video_frames(tmp_path / "so_far.mp4"))) >= len(frames[0])  # every frame made so far
    assert sorted(frames[0]) == list(range(1, len(frames[0]) + 1))  # frame 0 is the given one
    got = np.stack([frames[0][i] for i in sorted(frames[0])]).astype(int)
    expected = pipe(first_image=CLIP[0], prompt=CAPTIONS[0], num_frames=len(got) + 1, seed=5,
                    prompts=[{"frame": at, "prompt": CAPTIONS[1]}], recache_on_switch=True)[1:]
    assert np.abs(got - expected).max() <= 1  # PNG is lossless: the model's pixels
    shared = sorted(set(frames[1]) & set(frames[0]))  # the branch goes on from stream 0's last finished chunk
    assert shared and all(np.abs(frames[1][i].astype(int) - frames[0][i]).max() <= 1 for i in shared)


def _png_url(width: int, height: int, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


BAD = [
    ("not json", "not JSON"),
    ("[1, 2]", 'a JSON object with a "type"'),
    (json.dumps({"type": "dance"}), "no stream of yours is open"),
    (json.dumps({"type": "switch", "caption": "x"}), "no stream of yours is open"),
    (json.dumps({"type": "start", "seed": -1}), "seed must be an integer"),
    (json.dumps({"type": "start", "seed": "1"}), "seed must be an integer"),
    (json.dumps({"type": "start", "caption": 7}), "caption must be a string"),
    (json.dumps({"type": "start", "clip": 3}), "clip must be an index below 1"),
    (json.dumps({"type": "start", "clip": 0, "frame": 99}), "frame must be an index below 3"),
    (json.dumps({"type": "start", "clip": "../../etc/passwd"}), "clip must be an index"),
    (json.dumps({"type": "start", "image": "file:///etc/passwd"}), "data:image/... URL"),
    (json.dumps({"type": "start", "image": "data:image/png;base64,@@@"}), "not valid base64"),
    (json.dumps({"type": "start", "image": "data:image/png;base64," + base64.b64encode(b"junk").decode()}),
     "could not be decoded"),
    (json.dumps({"type": "start", "image": _png_url(8, 8, "GIF")}), "type GIF is not one of"),
    (json.dumps({"type": "start", "image": _png_url(300, 300)}), "more than 10000"),
    (json.dumps({"type": "start", "image": "data:image/png;base64," + "A" * 70000}), "larger than 50000 bytes"),
]


def test_malformed_messages_get_an_error_and_change_nothing():
    pipe = make_pipe()

    async def scenario():
        server = serve(pipe, limits=Limits(upload_bytes=50000, upload_pixels=10000, streams_per_client=1))
        async with TestClient(TestServer(server.app)) as client:
            viewer = Viewer(await client.ws_connect("/ws"))
            for text, _ in BAD:
                await viewer.ws.send_str(text)
                await viewer.until(lambda v, n=len(viewer.messages): len(v.messages) > n, "an error")
            await viewer.ws.send_bytes(b"\x00\x01")
            await viewer.until(lambda v: len(v.messages) > len(BAD), "an error")
            assert server.engine.streams == {}
            await viewer.send(type="start", image=_png_url(8, 8), caption="a red square", seed=1)
            await viewer.until(lambda v: v.messages[-1]["type"] == "started", "started")
            await viewer.send(type="start", seed=2)  # the viewer's cap is one stream
            await viewer.until(lambda v: v.messages[-1]["type"] == "error", "the cap")
            await viewer.send(type="stop", stream=12345)
            await viewer.until(lambda v: v.messages[-1]["type"] == "error", "not yours")
            await viewer.until(lambda v: len(v.frames.get(0, {})) >= 2, "frames")  # and it still streams
            return viewer.messages, server.refusals

    messages, refusals = run(scenario())
    for (text, expected), message in zip(BAD, messages):
        assert message["type"] == "error" and expected in message["message"], (text[:60], message)
    assert messages[len(BAD)]["message"] == "messages must be JSON text"
    assert "at most 1 streams per viewer" in messages[len(BAD) + 2]["message"] and refusals == 1
    assert "no stream of yours has id 12345" in messages[len(BAD) + 3]["message"]


def test_token_is_required_on_every_request():
    pipe = make_pipe()

    async def scenario():
        server = serve(pipe, token="s3cret")
        async with TestClient(TestServer(server.app)) as client:
            codes = [(await client.get(path)).status for path in ("/", "/status", "/ws", "/status?token=nope")]
            ok = (await client.get("/status?token=s3cret")).status
            ws = await client.ws_connect("/ws?token=s3cret")
            await ws.close()
            return codes, ok

    codes, ok = run(scenario())
    assert codes == [401, 401, 401, 401] and ok == 200


def test_200_streams_opened_and_closed_leave_no_slot_and_flat_memory():
    pipe = make_pipe()

    async def scenario():
        server = serve(pipe, max_rows=4)
        async with TestClient(TestServer(server.app)) as client:
            viewer = Viewer(await client.ws_connect("/ws"))
            rss = []
            for i in range(200):
                await viewer.send(type="start", clip=0, caption=CAPTIONS[i % 2], seed=i)
                await viewer.until(lambda v, n=i: sum(m["type"] == "started" for m in v.messages) > n, "started")
                await viewer.send(type="stop")
                await viewer.until(lambda v, n=i: sum(m["type"] == "stopped" for m in v.messages) > n, "stopped")
                if i in (49, 199):
                    rss.append(proc_status_mb("VmRSS"))
            status = await (await client.get("/status")).json()
            return rss, status, server.engine

    rss, status, engine = run(scenario())
    assert status["streams"] == 0 and status["free_rows"] == 4 and engine.streams == {}
    assert all(not buffer.any() for buffer in engine.pool.buffers)  # every closed stream's rows were zeroed
    assert rss[1] - rss[0] < 20  # MiB over the last 150 streams: nothing of a closed stream is kept


def test_a_slow_viewer_drops_its_own_frames_only():
    pipe = make_pipe()

    async def scenario():
        server = serve(pipe, limits=Limits(send_queue=2))
        async with TestClient(TestServer(server.app)) as client:
            slow, fast = Viewer(await client.ws_connect("/ws")), Viewer(await client.ws_connect("/ws"))
            for viewer, seed in ((slow, 1), (fast, 2)):
                await viewer.send(type="start", clip=0, caption=CAPTIONS[0], seed=seed)
                await viewer.until(lambda v: v.messages and v.messages[-1]["type"] == "started", "started")
            held = next(v for v in server.viewers if v.streams.keys() == {0})
            send = held.ws.send_bytes

            async def slow_send(data):  # a viewer on a slow link: each frame takes half a second to leave
                await asyncio.sleep(0.5)
                await send(data)

            held.ws.send_bytes = slow_send
            started = time.perf_counter()
            await fast.until(lambda v: len(v.frames.get(1, {})) >= 20, "20 frames")
            return time.perf_counter() - started, held.dropped

    seconds, dropped = run(scenario())
    assert dropped > 0 and seconds < 20 * 0.5  # the fast viewer got 20 frames in less time than the slow one gets 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model"
    pipe = make_pipe()
    pipe.config = dict(model=dict(load_config(ROOT / "configs" / "debug" / "tiny.py").model, in_channels=12,
                                  max_tpe_len=9),
                       vae=dict(type="PixelVAE", factor=2),
                       text_encoder=dict(type="WordHashEncoder", output_dim=16, model_max_length=6),
                       diffusion=dict(type="IDDPM"))
    pipe.save_pretrained(path)
    return path


def _start_server(path, port: int, *extra) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "causalvdm.cli.serve", "--ckpt", str(path), "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in 60 s")


def test_sigterm_mid_stream_closes_every_socket_with_a_reason(saved_pipe):
    port = _free_port()
    proc = _start_server(saved_pipe, port)

    async def scenario():
        async with ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                viewer = Viewer(ws)
                await viewer.send(type="start", caption=CAPTIONS[0], seed=0)
                await viewer.until(lambda v: len(v.frames.get(0, {})) >= 2, "frames")
                proc.send_signal(signal.SIGTERM)
                while True:
                    msg = await ws.receive()
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                        return ws.close_code, msg.extra

    try:
        code, reason = run(scenario())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert code == 1001 and "shutting down" in str(reason)


def test_off_localhost_needs_a_token(saved_pipe):
    result = subprocess.run([sys.executable, "-m", "causalvdm.cli.serve", "--ckpt", str(saved_pipe), "--host",
                             "0.0.0.0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "give --token as well" in result.stderr


def test_a_negative_deblocking_strength_is_refused(saved_pipe):
    result = subprocess.run([sys.executable, "-m", "causalvdm.cli.serve", "--ckpt", str(saved_pipe), "--deblock",
                             "-1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "argument --deblock: must be >= 0" in result.stderr


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed here (.ci/run installs it, and CI never skips this)")
def test_browser_watches_a_stream_and_switches_the_caption(saved_pipe, tmp_path):
    """Headless Chromium opens the page, starts a stream from the clip, sees the picture change over several chunks,
    switches the caption (the page shows where it lands) and saves a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = _free_port()
    clips = tmp_path / "clips.jsonl"
    write_clip(tmp_path / "clip.mp4")
    clips.write_text(json.dumps({"path": "clip.mp4", "caption": CAPTIONS[0]}) + "\n")
    proc = _start_server(saved_pipe, port, "--clips", str(clips))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "clip")).options) == 2)
        Select(driver.find_element(By.ID, "clip")).select_by_index(1)
        driver.find_element(By.ID, "start").click()
        canvas = driver.find_element(By.ID, "video")
        pixels = "return Array.from(arguments[0].getContext('2d').getImageData(0, 0, 8, 8).data).join(',')"
        frame = "return [Number(arguments[0].dataset.frame || 0), " + pixels.removeprefix("return ") + "]"
        wait.until(lambda d: int(canvas.get_attribute("data-frame") or 0) >= 3)
        early_frame, early = driver.execute_script(frame, canvas)
        wait.until(lambda d: int(canvas.get_attribute("data-frame") or 0) >= early_frame + 6)  # three chunks on
        assert driver.execute_script(pixels, canvas) != early  # the picture moves over the chunks
        caption = driver.find_element(By.ID, "caption")
        caption.clear()
        caption.send_keys(CAPTIONS[1])
        driver.find_element(By.ID, "switch").click()
        wait.until(lambda d: "at frame" in d.find_element(By.ID, "readout").text)  # lands at, or switched at
        at = int(driver.find_element(By.ID, "readout").text.rsplit(" ", 1)[1])
        wait.until(lambda d: int(canvas.get_attribute("data-frame") or 0) > at)
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0 and not driver.find_element(By.ID, "log").text
        assert "token_grid" in driver.find_element(By.ID, "legend").text  # the drift plot's legend
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)


def write_clip(path) -> None:
    """A 6-frame 8x8 mp4 of CLIP's frames (and their mirror images)."""
    from causalvdm.sampling.writer import StreamingVideoWriter

    with StreamingVideoWriter(path, 8, SIZE, SIZE) as writer:
        writer.write(np.concatenate([CLIP, CLIP[:, ::-1]]))


def test_load_tool_reports_every_viewer(saved_pipe, capsys):
    from causalvdm.benchmarks import serve_load

    port = _free_port()
    proc = _start_server(saved_pipe, port, "--max-rows", "4")
    try:
        assert serve_load.main(["--url", f"http://127.0.0.1:{port}", "--viewers", "1,3", "--seconds", "1",
                                "--stagger", "0.2"]) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("viewers=3 min_fps=") and lines[-1].endswith("/3")
    assert [line.split()[0] for line in lines[1:3]] == ["1", "3"]
