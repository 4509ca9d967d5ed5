"""Prompt switches of an autoregressive video, and resuming one: where a switch may fall, re-encoding the frames in
view under a new caption, and where a video saved as a cache state goes on.

A caption can change at a chunk boundary. In cache mode the frames already cached keep the keys/values of the old
caption, or are re-encoded under the new one (`reencode`): the generator keeps the latents of the frames in view
(sink + queue, bounded, `WrittenFrames`) and writes them again, each at its own position in the call that first
wrote it. Recompute mode runs the window under the current caption at every step, so it always re-encodes.
"""

import itertools
from collections.abc import Callable

import torch


def check_switches(n0: int, num_frames: int, frames: list[int], chunk_size: int) -> None:
    """Fail unless each prompt-switch frame starts a chunk of the video, n0 + i * chunk_size < num_frames, and no
    frame switches twice."""
    k = chunk_size
    for frame in frames:
        if frames.count(frame) > 1:
            raise ValueError(f"two prompt switches at frame {frame}")
        if frame >= num_frames:
            raise ValueError(f"prompt switch at frame {frame} is beyond the video's {num_frames} frames")
        if frame < n0 or (frame - n0) % k:
            below = n0 + (frame - n0) // k * k
            above = below + k if frame > n0 else n0
            nearest = [str(b) for b in (below, above) if n0 <= b < num_frames]
            raise ValueError(f"prompt switch at frame {frame} is not a chunk boundary (chunks of {k} from frame "
                             f"{n0}): the nearest {'are' if len(nearest) > 1 else 'is'} "
                             f"{' and '.join(nearest) or 'none'}")


def reencode(cache, written, given: int, chunk_size: int, write: Callable[[torch.Tensor], None]) -> None:
    """Reset the cache and write the frames in view (`written`, a WrittenFrames) again through `write`, each at its
    own position in the call that first wrote it (the `given` frames in calls of chunk_size, then chunks), so each is
    encoded as it first was but for the caption and the frames that have left the view."""
    positions = cache.positions.tolist()  # the sink, then the queue: the frames of written.sink, then written.window
    frames = written.frames
    if written.first is not None and positions[0] != 0:  # frame 0 has left the queue, its spatial keys are still read
        positions, frames = [0] + positions, torch.cat([written.first, frames], dim=2)

    def run(i: int) -> tuple[tuple[int, int], int]:  # frames i, i + 1 in one run: the same call, consecutive positions
        p = positions[i]
        return (0, p // chunk_size) if p < given else (1, (p - given) // chunk_size), p - i

    cache.reset()
    for _, run_indices in itertools.groupby(range(len(positions)), key=run):
        first, *rest = run_indices
        if positions[first] > cache.next_position:  # the frames in between have left the view
            cache.seek(positions[first])
        write(frames[:, :, first:first + 1 + len(rest)])


def resume_chunk(cache_state: dict, n0: int, chunk_size: int, schedule: dict, recache_on_switch: bool) -> int:
    """The chunk a video saved as `cache_state` (after some chunk, n0 given frames) goes on with; fails in one line
    on a state off the chunk grid, or when a later switch would re-encode (a state holds no latents)."""
    done, rest = divmod(int(cache_state["next_position"]) - n0, chunk_size)
    if done < 0 or rest:
        raise ValueError(f"cache state at frame {cache_state['next_position']} is not a chunk boundary "
                         f"after {n0} given frames in chunks of {chunk_size}")
    at = n0 + done * chunk_size
    if recache_on_switch and any(frame >= at for frame in schedule):
        raise ValueError("recache_on_switch needs the latents of the frames in view, which a cache state does not "
                         "hold: a resumed video must keep the cache at its later prompt switches")
    return done


def caption_at(schedule: dict, frame: int, y, mask) -> tuple:
    """The caption (y, mask) in force at `frame`: the last switch before it in `schedule` ({frame: (y, mask)}), else
    the video's first (y, mask)."""
    earlier = [switch for switch in schedule if switch < frame]
    return schedule[max(earlier)] if earlier else (y, mask)
