"""The live server: one process, one model, many viewers, each with a websocket, over the stream engine.

A tick loop runs `engine.step()` in one worker thread (the event loop stays free for the sockets) and hands each
finished chunk's frames to the viewers who own the stream; commands from the sockets change the engine only between
ticks (one lock). Frames go out as PNG, lossless, so a viewer sees exactly the model's pixels (a 32x32 demo frame
is about 2 KB); each binary message is the stream id and frame index (two big-endian uint32) then the PNG.

Messages from the page are JSON objects with a "type": start {caption, seed, image (a data: URL) or clip and
frame (an index into the server's clip list)}, switch {caption, recache}, pause, resume, stop, branch. Replies:
started, switching {at: frame}, paused, resumed, stopped, error {message}, and stats every tick. A bad message gets
an error on that socket and changes nothing. Each viewer has a bounded send queue: when it is full, that viewer's
frames are dropped and counted, never the tick.
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import secrets
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from aiohttp import WSMsgType, web
from PIL import Image

from causalvdm.data.transforms import video_transform
from causalvdm.sampling.drift import DriftMonitor
from causalvdm.sampling.writer import StreamingVideoWriter, to_uint8
from causalvdm.serving.engine import EngineFull

log = logging.getLogger("causalvdm.serve")

PAGE = Path(__file__).with_name("page.html")
IMAGE_TYPES = ("PNG", "JPEG", "WEBP")
DRIFT_KEPT = 64  # chunk records a stream's drift monitor keeps: a live stream has no end


@dataclass
class Limits:
    """What one client may ask for: upload bytes and pixels, streams per viewer, frames kept for the download."""

    upload_bytes: int = 4 * 2**20
    upload_pixels: int = 4096 * 4096
    streams_per_client: int = 2
    send_queue: int = 64  # frames waiting for a slow viewer before its frames are dropped
    kept_frames: int = 4096  # frames of a stream kept for the mp4 download (the oldest go first)


@dataclass(eq=False)  # a viewer is itself, not its fields: kept in a set
class Viewer:
    """One websocket: its streams (engine id -> the frames kept for the download), their download keys and drift
    monitors, send queue and drop count."""

    ws: web.WebSocketResponse
    queue: asyncio.Queue
    streams: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)  # engine id -> the secret its download URL carries
    drift: dict = field(default_factory=dict)
    dropped: int = 0


class BadMessage(ValueError):
    """A message the server refuses; its text goes back to the sender."""


def decode_image(data_url: str, limits: Limits) -> np.ndarray:
    """A data: URL of a PNG, JPEG or WebP image -> RGB uint8 (H, W, 3); BadMessage for anything else or too large."""
    if not isinstance(data_url, str) or not data_url.startswith("data:image/") or "," not in data_url:
        raise BadMessage("image must be a data:image/... URL")
    payload = data_url.split(",", 1)[1]
    if len(payload) > limits.upload_bytes * 4 // 3 + 4:
        raise BadMessage(f"image is larger than {limits.upload_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadMessage("image is not valid base64") from err
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in IMAGE_TYPES:
                raise BadMessage(f"image type {image.format} is not one of {', '.join(IMAGE_TYPES)}")
            if image.width * image.height > limits.upload_pixels:
                raise BadMessage(f"image has {image.width}x{image.height} pixels, more than {limits.upload_pixels}")
            return np.asarray(image.convert("RGB"))
    except BadMessage:
        raise
    except Exception as err:  # PIL raises many kinds for a broken file: all are the sender's
        raise BadMessage(f"image could not be decoded ({type(err).__name__})") from err


def png(frame: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG", compress_level=1)
    return out.getvalue()


class LiveServer:
    """The aiohttp application over a pipeline's stream engine (see the module docstring).

    pipe: a CausalVDMPipeline (its VAE, text encoder and image size); engine: `pipe.stream_engine(...)`;
    clips: [(name, frames uint8 (T, H, W, 3))] a start may pick a frame of; captions: suggestions for the page;
    token: when set, every request must carry it (?token=); limits: `Limits`.
    """

    def __init__(self, pipe, engine, clips=(), captions=(), token: str | None = None, limits: Limits | None = None):
        self.pipe, self.engine = pipe, engine
        self.clips, self.captions = list(clips), list(captions)
        self.token = token
        self.limits = limits or Limits()
        self.viewers: set[Viewer] = set()
        self.lock = asyncio.Lock()  # held by a tick, and by every command that changes the engine
        self.refusals = 0
        self.ticks = 0
        self.tick_seconds = 0.0
        self._owners: dict[int, Viewer] = {}
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.app = web.Application(middlewares=[self._check_token], client_max_size=self.limits.upload_bytes * 2)
        self.app.add_routes([web.get("/", self._page), web.get("/status", self._status), web.get("/ws", self._socket),
                             web.get("/download/{stream}", self._download)])
        self.app.on_startup.append(self._start_ticks)
        self.app.on_shutdown.append(self._shutdown)

    # ------------------------------------------------------------------------------ http
    @web.middleware
    async def _check_token(self, request, handler):
        if self.token is not None and not secrets.compare_digest(request.query.get("token", ""), self.token):
            raise web.HTTPUnauthorized(text="a token is required: add ?token=...")
        return await handler(request)

    async def _page(self, request):
        return web.FileResponse(PAGE)

    async def _status(self, request):
        return web.json_response(self.status())

    def status(self) -> dict:
        """Streams, frames/s per stream and in all, tick time, memory, refusals, dropped frames."""
        stats = self.engine.stats()
        return dict(streams=len(stats), viewers=len(self.viewers), ticks=self.ticks,
                    tick_seconds=round(self.tick_seconds, 4),
                    frames_per_s=round(sum(s["frames_per_s"] for s in stats.values()), 2),
                    per_stream={str(sid): dict(frames=s["frames"], frames_per_s=round(s["frames_per_s"], 2),
                                               keeps_up=s["keeps_up"]) for sid, s in stats.items()},
                    free_rows=self.engine.free_rows, pool_mb=round(self.engine.pool.nbytes / 2**20, 2),
                    refusals=self.refusals, dropped=sum(v.dropped for v in self.viewers), playback_fps=self.engine.fps,
                    captions=self.captions, clips=[name for name, _ in self.clips])

    async def _download(self, request):
        """The frames of a stream so far, as an mp4: the URL of its "started" message (stream id and its key)."""
        sid = request.match_info["stream"]
        owner = self._owners.get(int(sid)) if sid.isdigit() else None
        key = owner.keys.get(int(sid), "") if owner is not None else ""
        frames = owner.streams.get(int(sid)) if owner is not None else None
        if not key or not secrets.compare_digest(request.query.get("key", ""), key) or not frames:
            raise web.HTTPNotFound(text="no such stream, or no frames yet")
        path = Path(await asyncio.to_thread(self._write_mp4, list(frames)))
        try:
            return web.Response(body=path.read_bytes(), content_type="video/mp4")
        finally:
            path.unlink(missing_ok=True)

    def _write_mp4(self, frames) -> str:
        handle, path = tempfile.mkstemp(suffix=".mp4")
        os.close(handle)
        height, width = frames[0].shape[:2]
        with StreamingVideoWriter(path, round(self.engine.fps), width, height, crf=self.pipe.defaults.crf) as writer:
            writer.write(np.stack(frames))
        return path

    # ------------------------------------------------------------------------------ sockets
    async def _socket(self, request):
        ws = web.WebSocketResponse(max_msg_size=self.limits.upload_bytes * 2, heartbeat=30)
        await ws.prepare(request)
        viewer = Viewer(ws, asyncio.Queue(self.limits.send_queue))
        self.viewers.add(viewer)
        sender = asyncio.create_task(self._send_frames(viewer))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    await self._error(viewer, "messages must be JSON text")
                    continue
                try:
                    await self._handle(viewer, msg.data)
                except (BadMessage, ValueError) as err:  # the engine's checks raise ValueError in one line
                    await self._error(viewer, str(err))
                except Exception:  # a fault of ours: logged in full, the viewer told, everyone else served
                    log.exception("message %.200s", msg.data)
                    await self._error(viewer, "internal error (logged on the server)")
        finally:
            sender.cancel()
            self.viewers.discard(viewer)
            async with self.lock:  # the disconnect frees the rows by the next tick
                for sid in list(viewer.streams):
                    self._close(viewer, sid)
        return ws

    async def _error(self, viewer: Viewer, message: str) -> None:
        await viewer.ws.send_json(dict(type="error", message=message))

    async def _handle(self, viewer: Viewer, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadMessage(f"not JSON: {err.msg}") from err
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise BadMessage('a message is a JSON object with a "type"')
        kind = msg["type"]
        if kind == "start":
            return await self._start(viewer, msg)
        sid = msg.get("stream", next(reversed(viewer.streams), None))
        if sid not in viewer.streams:
            raise BadMessage(f"{kind}: no stream of yours {'is open' if sid is None else f'has id {sid!r}'}")
        async with self.lock:
            if kind == "switch":
                y, mask = self._caption(msg.get("caption", ""))
                at = self.engine.switch(sid, y, mask, recache=bool(msg.get("recache", False)))
                await viewer.ws.send_json(dict(type="switching", stream=sid, at=at))
            elif kind in ("pause", "resume"):
                self.engine.pause(sid, kind == "pause")
                await viewer.ws.send_json(dict(type=kind + "d", stream=sid))
            elif kind == "stop":
                self._close(viewer, sid)
                await viewer.ws.send_json(dict(type="stopped", stream=sid))
            elif kind == "branch":
                self._check_room(viewer)
                new = self._open(viewer, lambda: self.engine.open(state=self.engine.save(sid),
                                                                  seed=self._seed(msg.get("seed", 0))))
                await viewer.ws.send_json(dict(type="started", stream=new, branch_of=sid,
                                               download=f"/download/{new}?key={viewer.keys[new]}"))
            else:
                raise BadMessage(f"unknown message type {kind!r}")

    async def _start(self, viewer: Viewer, msg: dict) -> None:
        seed = self._seed(msg.get("seed", 0))
        caption = msg.get("caption", "")
        first = self._first_frame(msg)
        y, mask = self._caption(caption)
        async with self.lock:
            self._check_room(viewer)
            latents = None
            if first is not None:
                latents = await asyncio.to_thread(self._encode, first)
            sid = self._open(viewer, lambda: self.engine.open(latents, y=y, mask=mask, seed=seed,
                                                              guided=self.engine.rows_needed(True) == 2))
        await viewer.ws.send_json(dict(type="started", stream=sid, seed=seed, caption=caption,
                                       download=f"/download/{sid}?key={viewer.keys[sid]}"))

    def _seed(self, value) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise BadMessage(f"seed must be an integer in [0, 2^31), got {value!r}")
        return value

    def _caption(self, caption):
        if not isinstance(caption, str) or len(caption) > 2000:
            raise BadMessage("caption must be a string of at most 2000 characters")
        return self.pipe.encode_prompt(caption)

    def _first_frame(self, msg: dict) -> np.ndarray | None:
        """The start's first frame: an uploaded image, a frame of one of the server's clips, or none."""
        if msg.get("image") is not None:
            return decode_image(msg["image"], self.limits)
        if msg.get("clip") is not None:
            clip, frame = msg["clip"], msg.get("frame", 0)
            if not isinstance(clip, int) or not 0 <= clip < len(self.clips):
                raise BadMessage(f"clip must be an index below {len(self.clips)}, got {clip!r}")
            frames = self.clips[clip][1]
            if not isinstance(frame, int) or not 0 <= frame < len(frames):
                raise BadMessage(f"frame must be an index below {len(frames)}, got {frame!r}")
            return frames[frame]
        return None

    def _encode(self, frame: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> latents (1, C, 1, h, w) at the pipeline's image size."""
        pixels = video_transform(torch.from_numpy(np.array(frame))[None], self.pipe.image_size)  # a writable copy
        with torch.inference_mode():
            return self.pipe.vae.encode(pixels[None].to(self.pipe.device))

    def _check_room(self, viewer: Viewer) -> None:
        if len(viewer.streams) >= self.limits.streams_per_client:
            self.refusals += 1
            raise BadMessage(f"at most {self.limits.streams_per_client} streams per viewer: stop one first")

    def _open(self, viewer: Viewer, open_stream) -> int:
        try:
            sid = open_stream()
        except EngineFull as err:
            self.refusals += 1
            raise BadMessage(str(err)) from err
        viewer.streams[sid] = []
        viewer.keys[sid] = secrets.token_urlsafe(16)
        viewer.drift[sid] = DriftMonitor(token=self.pipe.token_pixels)
        self._owners[sid] = viewer
        return sid

    def _close(self, viewer: Viewer, sid: int) -> None:
        viewer.streams.pop(sid, None)
        viewer.keys.pop(sid, None)
        viewer.drift.pop(sid, None)
        self._owners.pop(sid, None)
        if sid in self.engine.streams:
            self.engine.close(sid)

    async def _send_frames(self, viewer: Viewer) -> None:
        while True:
            message = await viewer.queue.get()
            if isinstance(message, bytes):
                await viewer.ws.send_bytes(message)
            else:
                await viewer.ws.send_json(message)

    # ------------------------------------------------------------------------------ ticks
    async def _start_ticks(self, app) -> None:
        self._loop_task = asyncio.create_task(self._ticks())

    async def _ticks(self) -> None:
        while not self._stopping:
            async with self.lock:
                if not any(not s.paused for s in self.engine.streams.values()):
                    frames = None
                else:
                    frames = await self._tick()
            if frames is None:
                await asyncio.sleep(0.02)
                continue
            for chunk, pictures, pngs in frames:
                viewer = self._owners.get(chunk.stream)
                if viewer is None:
                    continue
                kept = viewer.streams[chunk.stream]
                kept.extend(pictures)
                del kept[:-self.limits.kept_frames]
                for i, raw in enumerate(pngs):
                    self._push(viewer, struct.pack(">II", chunk.stream, chunk.start + i) + raw)
                self._push(viewer, dict(type="chunk", stream=chunk.stream, index=chunk.index, start=chunk.start,
                                        latency=round(chunk.latency, 4), dropped=viewer.dropped,
                                        drift=self._drift(viewer, chunk.stream, pictures),
                                        **self._figures(chunk.stream)))

    async def _tick(self) -> list:
        """One engine tick in the worker thread -> the finished chunks' frames (see `_frames`)."""
        started = time.perf_counter()
        chunks = await asyncio.to_thread(self.engine.step)
        self.tick_seconds = time.perf_counter() - started
        self.ticks += 1
        return await asyncio.to_thread(self._frames, chunks)

    @staticmethod
    def _frames(chunks):
        """Finished chunks -> (chunk, frames uint8 [(H, W, 3)], their PNGs), off the event loop."""
        out = []
        for chunk in chunks:
            pictures = list(to_uint8(chunk.frames[0]))
            out.append((chunk, pictures, [png(picture) for picture in pictures]))
        return out

    @staticmethod
    def _drift(viewer: Viewer, sid: int, pictures) -> dict:
        """The drift monitor's statistics of a stream's new chunk (luma mean and std, sharpness, change, token grid)
        and which left their band."""
        monitor = viewer.drift[sid]
        record = monitor.add(np.stack(pictures))
        del monitor.chunks[:-DRIFT_KEPT]
        values = {name: None if record[name] is None else round(float(np.mean(record[name])), 3)
                  for name in monitor.statistics}
        return dict(values, out_of_band=record["out_of_band"])

    def _figures(self, sid: int) -> dict:
        stats = self.engine.stats().get(sid, {})
        return dict(frames_per_s=round(stats.get("frames_per_s", 0.0), 2), keeps_up=stats.get("keeps_up", False),
                    tick_seconds=round(self.tick_seconds, 4))

    def _push(self, viewer: Viewer, message) -> None:
        """Queue a message for a viewer; a full queue drops it (a slow viewer never holds up the tick)."""
        try:
            viewer.queue.put_nowait(message)
        except asyncio.QueueFull:
            viewer.dropped += isinstance(message, bytes)

    async def _shutdown(self, app) -> None:
        """Stop ticking after the tick in flight, and close every socket with a reason."""
        self._stopping = True
        async with self.lock:
            if self._loop_task is not None:
                self._loop_task.cancel()
            for viewer in list(self.viewers):
                await viewer.ws.close(code=1001, message=b"server shutting down")
