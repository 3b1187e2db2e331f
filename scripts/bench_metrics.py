"""Benchmark peftvlm's CIDEr-D and BLEU against pycocoevalcap on a synthetic COCO-sized set.

Builds N images x R reference captions (Zipf-distributed words, 8-14 words each, like COCO)
plus one candidate per image, already tokenised, then times both implementations in the same
run, checks they agree to 1e-6 and prints seconds and speed-up. The target is CIDEr-D + BLEU
over 5,000 x 5 in under 5 s on 2 cores.

    python scripts/bench_metrics.py                 # 5,000 images x 5 references
    python scripts/bench_metrics.py --images 500 --repeat 3 --tokenize
"""

from __future__ import annotations

import argparse
import random
import time


def synthetic_captions(images: int, refs: int, seed: int = 0, vocab: int = 3000):
    """(predictions, references): tokenised lower-case captions with a Zipf word distribution."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1 / (i + 1) for i in range(vocab)]

    def caption():
        return " ".join(rng.choices(words, weights, k=rng.randint(8, 14)))
    references = [[caption() for _ in range(refs)] for _ in range(images)]
    predictions = [caption() for _ in range(images)]
    return predictions, references


def best_time(fn, repeat: int):
    """(fastest seconds, result) over `repeat` runs."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5, help="reference captions per image")
    parser.add_argument("--repeat", type=int, default=1, help="runs per timing; best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenize", action="store_true",
                        help="also time PTB tokenisation of the whole set (Java, else Python)")
    args = parser.parse_args()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from peftvlm.metrics import captioning

    preds, refs = synthetic_captions(args.images, args.refs, args.seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    print(f"{args.images} images x {args.refs} references, best of {args.repeat}")
    print(f"{'metric':8} {'peftvlm s':>10} {'pycocoevalcap s':>16} {'speed-up':>9}  max |diff|")
    total_ours = total_ref = 0.0
    cases = [
        ("BLEU", lambda: captioning.bleu(preds, refs),
         lambda: Bleu(4).compute_score(gts, res, verbose=0)[0],
         lambda ours, ref: [ours[f"bleu_{k}"] for k in range(1, 5)], lambda ref: list(ref)),
        ("CIDEr-D", lambda: captioning.cider_d_per_image(preds, refs),
         lambda: Cider().compute_score(gts, res)[1],
         lambda ours, ref: ours, lambda ref: list(ref)),
    ]
    for name, ours_fn, ref_fn, ours_vals, ref_vals in cases:
        t_ours, ours = best_time(ours_fn, args.repeat)
        t_ref, ref = best_time(ref_fn, args.repeat)
        diff = max(abs(a - b) for a, b in zip(ours_vals(ours, ref), ref_vals(ref)))
        total_ours, total_ref = total_ours + t_ours, total_ref + t_ref
        print(f"{name:8} {t_ours:10.3f} {t_ref:16.3f} {t_ref / t_ours:8.1f}x  {diff:.1e}")
        if diff > 1e-6:
            raise SystemExit(f"{name}: implementations disagree by {diff}")
    print(f"{'both':8} {total_ours:10.3f} {total_ref:16.3f} {total_ref / total_ours:8.1f}x")
    if args.tokenize:
        t_tok, (_, _, note) = best_time(lambda: captioning.tokenize(preds, refs), args.repeat)
        print(f"tokenising {args.images * (args.refs + 1)} captions: {t_tok:.3f} s ({note})")


if __name__ == "__main__":
    main()
