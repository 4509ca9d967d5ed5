"""Load a running live server with N websocket viewers and report what each gets (tools/load_serve.py).

    bash scripts/serve.sh --ckpt CKPT --clips data/demo_long/captions.jsonl --max-rows 16 &
    python tools/load_serve.py --url http://127.0.0.1:8765 --viewers 1,4,8,16 --seconds 20 [--stagger 0.5]

For each N of --viewers, N viewers connect, at once or --stagger seconds apart (as viewers arrive, each at another
point of its chunks), each starts a stream (the first clip's first frame if the server has clips, its captions in
turn, seed = the viewer's number), and all count the frames they receive for --seconds from the moment the last of
them has its first frame. Printed per N: delivered frames/s per viewer (mean and lowest), the p95 interval between
frames, dropped frames (the server's count for the viewer), and how many viewers keep up with the server's playback
rate. The streams are stopped before the next N. The last line is
    viewers=<N> min_fps=<f> keep_up=<k>/<N>
for the largest N.
"""

import asyncio
import json
import statistics
import sys
import time

from aiohttp import ClientSession, WSMsgType

from causalvdm.cli.common import ArgumentParser, non_negative_float, positive_float, positive_int


class AllWatching:
    """Set when every one of `viewers` has its first frame: from then on all their streams run."""

    def __init__(self, viewers: int):
        self.waiting, self.since = viewers, None

    def first_frame(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.since = time.perf_counter()


async def one_viewer(session, url: str, number: int, status: dict, seconds: float, delay: float,
                     watching: AllWatching) -> dict:
    """One viewer's stream, started after `delay` seconds -> frames/s, p95 frame interval (s), dropped frames, over
    the `seconds` after every viewer has its first frame."""
    await asyncio.sleep(delay)
    start = dict(type="start", seed=number)
    if status["clips"]:
        start.update(clip=0, frame=0)
    if status["captions"]:
        start["caption"] = status["captions"][number % len(status["captions"])]
    arrivals, dropped, seen = [], 0, False
    async with session.ws_connect(url) as ws:
        await ws.send_json(start)
        while watching.since is None or time.perf_counter() - watching.since < seconds:
            msg = await ws.receive(timeout=max(60.0, seconds))
            if msg.type == WSMsgType.BINARY:
                if not seen:
                    seen = True
                    watching.first_frame()
                if watching.since is not None:
                    arrivals.append(time.perf_counter())
            elif msg.type == WSMsgType.TEXT:
                message = json.loads(msg.data)
                if message["type"] == "error":
                    raise RuntimeError(f"viewer {number}: the server refused: {message['message']}")
                dropped = message.get("dropped", dropped)
            else:
                raise RuntimeError(f"viewer {number}: the socket closed ({msg.extra})")
        await ws.send_json(dict(type="stop"))
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:])) or [float("inf")]
    fps = (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9) if len(arrivals) > 1 else 0.0
    return dict(fps=fps, p95=gaps[int(0.95 * (len(gaps) - 1))], dropped=dropped, frames=len(arrivals))


async def run(args) -> list[dict]:
    query = f"?token={args.token}" if args.token else ""
    rows = []
    async with ClientSession() as session:
        status = await (await session.get(f"{args.url}/status{query}")).json()
        ws_url = args.url.replace("http", "ws", 1) + "/ws" + query
        print(f"{'viewers':>7} {'fps_mean':>8} {'fps_min':>8} {'p95_gap_s':>9} {'dropped':>7} {'keep_up':>7}  "
              f"(playback {status['playback_fps']} fps)")
        for n in args.viewers:
            watching = AllWatching(n)
            results = await asyncio.gather(*(one_viewer(session, ws_url, i, status, args.seconds, i * args.stagger,
                                                        watching) for i in range(n)))
            fps = [r["fps"] for r in results]
            row = dict(viewers=n, fps_mean=statistics.mean(fps), fps_min=min(fps),
                       p95=max(r["p95"] for r in results), dropped=sum(r["dropped"] for r in results),
                       keep_up=sum(f >= status["playback_fps"] for f in fps))
            rows.append(row)
            print(f"{n:7d} {row['fps_mean']:8.2f} {row['fps_min']:8.2f} {row['p95']:9.3f} {row['dropped']:7d} "
                  f"{row['keep_up']:4d}/{n:<3d}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the server (default http://127.0.0.1:8765)")
    parser.add_argument("--token", help="the server's --token, if it has one")
    parser.add_argument("--viewers", type=lambda text: [positive_int(n) for n in text.split(",")],
                        default=[1, 4, 8, 16],
                        help="comma-separated viewer counts (default 1,4,8,16)")
    parser.add_argument("--seconds", type=positive_float, default=20.0, help="seconds the viewers count frames, "
                        "from when the last of them has its first (default 20)")
    parser.add_argument("--stagger", type=non_negative_float, default=0.0, help="seconds between one viewer's start "
                        "and the next's (default 0: all at once)")
    args = parser.parse_args(argv)
    try:
        rows = asyncio.run(run(args))
    except (OSError, RuntimeError, asyncio.TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    last = rows[-1]
    print(f"viewers={last['viewers']} min_fps={last['fps_min']:.2f} keep_up={last['keep_up']}/{last['viewers']}")
    return 0
