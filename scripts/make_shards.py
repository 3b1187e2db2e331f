"""Write a JSONL of conversation rows (any row format peftvlm reads) as WebDataset tar shards.

Each row becomes one sample: `NNNNNN.json` (the row, its image paths replaced by the sample's
file names) and its images beside it (`NNNNNN.0.png`, `NNNNNN.1.jpg`, ...), the layout
`streaming: true` reads (docs/streaming.md). Rows whose images are missing are copied as they
are (the stream counts them as bad rows when it trains); images given in content items
(OpenAI `image_url`) stay paths (then set the source's `image_root` to their folder).

Run: python scripts/make_shards.py DATA.jsonl OUT_DIR [--rows-per-shard 10000] [--image-root DIR]
Then: data: {train: {path: OUT_DIR/train-*.tar}, streaming: true}
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_files(key: str, row: dict, image_root: Path) -> dict[str, bytes]:
    """A row's sample: its images as `key.i.ext` files, the row naming them by extension."""
    field = "images" if "images" in row else "image" if "image" in row else None
    images = row.get(field) if field else None
    paths = images if isinstance(images, list) else [images] if images else []
    files, names = {}, []
    for i, path in enumerate(paths):
        source = image_root / path if isinstance(path, str) else None
        if source is None or not source.is_file():
            return {"json": json.dumps(row).encode()}  # kept as it is: a counted bad row later
        ext = f"{i}{source.suffix.lower()}"
        files[ext], names = source.read_bytes(), names + [ext]
    if field:
        row = {**row, field: names if isinstance(images, list) else names[0]}
    return {"json": json.dumps(row, ensure_ascii=False).encode(), **files}


def write_shards(jsonl: Path, out: Path, rows_per_shard: int = 10_000,
                 image_root: Path | None = None) -> list[Path]:
    """Shards `out/train-000000.tar`, ... of `rows_per_shard` samples each."""
    import itertools

    out.mkdir(parents=True, exist_ok=True)
    image_root = image_root or jsonl.parent
    shards = []
    with jsonl.open() as f:
        lines = enumerate(f)
        while chunk := list(itertools.islice(lines, rows_per_shard)):
            shards.append(out / f"train-{len(shards):06d}.tar")
            with tarfile.open(shards[-1], "w") as tar:
                for n, line in chunk:
                    key = f"{n:09d}"
                    try:
                        files = sample_files(key, json.loads(line), image_root)
                    except json.JSONDecodeError:
                        files = {"json": line.encode()}
                    for ext, data in files.items():
                        add_file(tar, f"{key}.{ext}", data)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder image paths are relative to (default: the JSONL's)")
    args = parser.parse_args()
    shards = write_shards(args.jsonl, args.out, args.rows_per_shard, args.image_root)
    print(f"{len(shards)} shard(s) in {args.out}")


if __name__ == "__main__":
    main()
