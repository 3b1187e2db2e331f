"""Videos in rows: a folder of frame images, or a video file decoded with PyAV (mp4, webm, mkv,
mov, avi) or Pillow (animated GIF / WebP).

A checked video is `{"path": absolute path, "frames": [frame indices]}`: which frames to use is
decided once, when rows are checked (every frame decoded then, so a broken file is a counted bad
row, not a crash at step N), and the collator decodes exactly those frames. Sampling: video
files at `data.video_fps` frames per second of video, frame folders frame by frame; then at most
`data.video_max_frames`, evenly spaced. Which families take video is their spec's business
(`FamilySpec.takes_video`); rows with videos for any other family stop the run with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.readers import IMAGE_SUFFIXES
from peftvlm.data.sources import BadRow
from peftvlm.errors import DataError

PYAV_SUFFIXES = {".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi", ".mpeg", ".mpg"}
PIL_SUFFIXES = {".gif", ".webp"}


@dataclass(frozen=True)
class VideoOptions:
    fps: float | None = 2.0
    max_frames: int = 16


def resolve_video(video, root: Path, options: VideoOptions) -> dict:
    """A video named in a row -> `{"path", "frames"}`, checked by decoding it, or `BadRow`."""
    if isinstance(video, dict) and video.get("path"):
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
        picked = evenly(range(len(frames)), options.max_frames)
        from peftvlm.data.images import check_image

        for i in picked:
            check_image(frames[i], f"{video}/{frames[i].name}")
        return {"path": str(path), "frames": picked}
    if path.suffix.lower() not in PYAV_SUFFIXES | PIL_SUFFIXES:
        raise BadRow("bad_video", f"{video}: unknown video type {path.suffix!r} (use a folder of "
                                  f"frames or {', '.join(sorted(PYAV_SUFFIXES | PIL_SUFFIXES))})")
    total, rate = probe(path, video)
    step = 1.0 if not options.fps or not rate else max(rate / options.fps, 1.0)
    picked = evenly([int(i * step) for i in range(int(total / step))], options.max_frames)
    return {"path": str(path), "frames": picked}


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

    from peftvlm.data.images import load_rgb

    path, wanted = Path(video["path"]), list(video["frames"])
    if path.is_dir():
        files = frame_files(path)
        frames = [load_rgb(files[i]) for i in wanted]
    else:
        keep = set(wanted)
        frames = [f for i, f in enumerate(decode(path)) if i in keep]
    size = frames[0].size
    # Frames of one video share a size (the processor stacks them); odd ones are resized.
    return np.stack([np.asarray(f if f.size == size else f.resize(size)) for f in frames])


def check_video_support(rows: list[dict], family, model_id: str) -> None:
    """Rows with videos need a family that takes video; otherwise stop before training."""
    if family.takes_video:
        return
    with_video = rows_with_video(rows)
    if with_video:
        raise DataError(f"{with_video} row(s) have videos, but {model_id} ({family.name}) does "
                        "not take video input in peftvlm",
                        hint="use a Qwen2-VL / Qwen2.5-VL model, or give frames as images")


def rows_with_video(rows) -> int:
    """How many rows carry videos; Arrow-backed rows (`table.Rows`) are counted by searching
    their JSON text column, so a warm start over a large table decodes no row."""
    if hasattr(rows, "column"):
        import pyarrow.compute as pc

        return int(pc.sum(pc.match_substring(rows.column("row"), '"videos": ')).as_py() or 0)
    return sum(1 for r in rows if r.get("videos"))
