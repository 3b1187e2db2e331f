"""Write small annotation files in public layouts (COCO captions, VQAv2, RefCOCO-style boxes)
plus their images into a folder, to try templates and sources on files of your own.

Run: python scripts/make_fixture_data.py OUT_DIR [--layouts coco-captions vqav2 refcoco]
         [--train-size 200] [--eval-size 20] [--image-size 32] [--seed 0]
Then point a recipe at them, e.g. (paths relative to the recipe):
  data: {template: caption, train: {path: OUT_DIR/coco-captions/captions_train.json}}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftvlm.data.read.fixtures import FIXTURES, write_fixture  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write into (one subfolder each)")
    parser.add_argument("--layouts", nargs="+", choices=FIXTURES, default=list(FIXTURES))
    parser.add_argument("--train-size", type=int, default=200, help="images in the train split")
    parser.add_argument("--eval-size", type=int, default=20, help="images in the test split")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.layouts:
        files = write_fixture(name, args.out_dir / name, args.train_size, args.eval_size,
                              args.image_size, args.seed)
        for split, paths in files.items():
            print(f"{name} {split}: " + ", ".join(f"{k}={v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
