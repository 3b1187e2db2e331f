"""Videos in rows: a folder of frame images, or a video file decoded with PyAV (mp4, webm, mkv,
mov, avi) or Pillow (animated GIF / WebP).

A checked video is `{"path": absolute path, "frames": [frame indices], "fps": the source's frame
rate, "total": its frame count}`: which frames to use is decided once, when rows are checked
(every frame decoded then, so a broken file is a counted bad row, not a crash at step N), and the
collator decodes exactly those frames. Sampling: `data.video_fps` frames per second of the
source, then at most `data.video_max_frames`, evenly spaced; or exactly `data.video_num_frames`
spread over the whole clip. The source's rate is the file's own; a frame folder (or a GIF without
frame durations) has none, so it is the row's `{"path", "fps"}` if given, else `data.video_fps`
(the folder's frames are taken as already sampled: used frame by frame), else 2 fps.

`metadata(video)` is what transformers' processors read timing from (`VideoMetadata`): Qwen2.5-VL
its temporal rotary positions (`second_per_grid_ts`), Qwen3-VL its `<t seconds>` stamps. Which
families take video is their spec's business (`FamilySpec.takes_video`); rows with videos for
any other family stop the run with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.read.images import load_rgb
from peftvlm.data.read.readers import IMAGE_SUFFIXES
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError

PYAV_SUFFIXES = {".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi", ".mpeg", ".mpg"}
PIL_SUFFIXES = {".gif", ".webp"}


# The rate assumed where neither the source nor the recipe gives one: Qwen's processors sample
# at 2 fps by default (`Qwen2VLVideoProcessor.fps`, `Qwen3VLVideoProcessor.fps`).
DEFAULT_FPS = 2.0


@dataclass(frozen=True)
class VideoOptions:
    fps: float | None = 2.0
    max_frames: int = 16
    num_frames: int | None = None


def resolve_video(video, root: Path, options: VideoOptions) -> dict:
    """A video named in a row (a path, or `{"path", "fps"}`) -> `{"path", "frames", "fps",
    "total"}`, checked by decoding it, or `BadRow`."""
    given_fps = None
    if isinstance(video, dict) and video.get("path"):
        given_fps = row_fps(video)
        video = video["path"]
    if not isinstance(video, str) or not video.strip():
        raise BadRow("bad_video", f"video {str(video)[:60]!r} is not a path to a video file or "
                                  "a folder of frames")
    path = (root / video).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadRow("path_escapes_root", f"{video} is outside the data folder {root}")
    if not path.exists():
        raise BadRow("missing_video", f"{video} not found")
    if path.is_dir():
        frames = frame_files(path)
        total, rate = len(frames), given_fps
    elif path.suffix.lower() not in PYAV_SUFFIXES | PIL_SUFFIXES:
        raise BadRow("bad_video", f"{video}: unknown video type {path.suffix!r} (use a folder of "
                                  f"frames or {', '.join(sorted(PYAV_SUFFIXES | PIL_SUFFIXES))})")
    else:
        total, rate = probe(path, video)
        rate = given_fps or rate
    rate = rate or options.fps or DEFAULT_FPS
    picked = pick_frames(total, rate, options)
    if path.is_dir():
        from peftvlm.data.read.images import check_image

        for i in sorted(set(picked)):
            check_image(frames[i], f"{video}/{frames[i].name}")
    return {"path": str(path), "frames": picked, "fps": rate, "total": total}


def row_fps(video: dict) -> float | None:
    """A row's own frame rate for its video (`{"path": ..., "fps": 4}`), checked."""
    fps = video.get("fps")
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise BadRow("bad_video", f"video fps {fps!r} is not a positive number of frames per "
                                  "second")
    return float(fps)


def pick_frames(total: int, rate: float, options: VideoOptions) -> list[int]:
    """Indices of the frames to train on, out of `total` frames at `rate` per second."""
    if options.num_frames:
        # Spread over the whole clip, as transformers' `default_sample_indices_fn` does
        # (`arange(n) * total // n`); a shorter clip repeats frames instead of failing.
        return [i * total // options.num_frames for i in range(options.num_frames)]
    step = 1.0 if not options.fps else max(rate / options.fps, 1.0)
    return evenly([int(i * step) for i in range(max(int(total / step), 1))], options.max_frames)


def metadata(video: dict) -> dict:
    """`transformers.video_utils.VideoMetadata` fields of a checked video: the source's rate
    and frame count and the indices used, from which processors compute the sampled rate
    (`VideoMetadata.sampled_fps`) and frame timestamps (`VideoMetadata.timestamps`)."""
    rate = video.get("fps") or DEFAULT_FPS
    total = video.get("total") or len(video["frames"])
    # a fresh list: Qwen3-VL's processor pads the index list in place
    return {"total_num_frames": total, "fps": rate, "frames_indices": list(video["frames"]),
            "duration": total / rate}


def evenly(indices, limit: int) -> list[int]:
    """At most `limit` of `indices`, evenly spaced, first one included."""
    indices = list(indices)
    if len(indices) <= limit:
        return indices
    return [indices[int(i * len(indices) / limit)] for i in range(limit)]


def frame_files(folder: Path) -> list[Path]:
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise BadRow("bad_video", f"frame folder {folder.name} holds no images")
    return frames


def probe(path: Path, name: str) -> tuple[int, float | None]:
    """(frame count, frames per second) after decoding every frame once."""
    try:
        total = sum(1 for _ in decode(path))
        rate = frame_rate(path)
    except BadRow:
        raise
    except Exception as exc:  # PyAV / Pillow raise their own types for broken streams
        raise BadRow("corrupt_video", f"{name} does not decode: {exc}") from exc
    if not total:
        raise BadRow("corrupt_video", f"{name} has no frames")
    return total, rate


def frame_rate(path: Path) -> float | None:
    if path.suffix.lower() in PIL_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            duration = im.info.get("duration")  # milliseconds per frame
        return 1000.0 / duration if duration else None
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else None


def decode(path: Path):
    """Every frame of a video file as an RGB PIL image, in order."""
    if path.suffix.lower() in PIL_SUFFIXES:
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                yield frame.convert("RGB")
        return
    try:
        import av
    except ImportError as exc:
        raise BadRow("bad_video", "decoding video files needs PyAV: pip install av "
                                  "(or give a folder of frames)") from exc
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_image()


def load_frames(video: dict):
    """The checked video's chosen frames as a `(frames, height, width, 3)` uint8 array."""
    import numpy as np

    path, wanted = Path(video["path"]), list(video["frames"])
    if path.is_dir():
        files = frame_files(path)
        frames = [load_rgb(files[i]) for i in wanted]
    else:
        keep = set(wanted)
        decoded = {i: f for i, f in enumerate(decode(path)) if i in keep}
        frames = [decoded[i] for i in wanted]  # `video_num_frames` may repeat a frame
    size = frames[0].size
    # Frames of one video share a size (the processor stacks them); odd ones are resized.
    return np.stack([np.asarray(f if f.size == size else f.resize(size)) for f in frames])


def check_video_support(rows: list[dict], family, model_id: str) -> None:
    """Rows with videos need a family that takes video (and, where the family stacks a batch's
    clips into one tensor, the same frame count in every clip); otherwise stop before training."""
    with_video = rows_with_video(rows)
    if not with_video:
        return
    if not family.takes_video:
        from peftvlm.families import FAMILIES

        takers = ", ".join(f.name for f in FAMILIES.values() if f.takes_video)
        why = f": {family.video_refusal}" if family.video_refusal else ""
        raise DataError(f"{with_video} row(s) have videos, but {model_id} ({family.name}) does "
                        f"not take video input in peftvlm{why}",
                        hint=f"use a model of a family that takes video ({takers}), or give "
                             "frames as images")
    if family.uniform_video_frames:
        counts = frame_counts(rows)
        if len(counts) > 1:
            raise uneven_frames_error(family, counts)


def uneven_frames_error(family, counts) -> DataError:
    listed = ", ".join(str(c) for c in sorted(counts)[:6])
    return DataError(f"clips have different frame counts ({listed}), but {family.name} "
                     f"{family.uniform_video_frames}",
                     hint="set data.video_num_frames: N to sample exactly N frames from every "
                          "clip (spread over the whole clip)")


def frame_counts(rows) -> set[int]:
    """The distinct frame counts of the rows' clips (Arrow rows: only rows with videos decoded)."""
    if hasattr(rows, "column"):
        import numpy as np
        import pyarrow.compute as pc

        found = pc.match_substring(rows.column("row"), '"videos": ').to_numpy(zero_copy_only=False)
        rows = [rows[int(i)] for i in np.flatnonzero(found)]
    return {len(v["frames"]) for r in rows for v in r.get("videos") or ()}


def rows_with_video(rows) -> int:
    """How many rows carry videos; Arrow-backed rows (`table.Rows`) are counted by searching
    their JSON text column, so a warm start over a large table decodes no row."""
    if hasattr(rows, "column"):
        import pyarrow.compute as pc

        return int(pc.sum(pc.match_substring(rows.column("row"), '"videos": ')).as_py() or 0)
    return sum(1 for r in rows if r.get("videos"))
