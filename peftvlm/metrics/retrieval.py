"""Retrieval metrics: Recall@K, mAP, MRR and NDCG@K over ranked lists, and image<->text recall
in both directions from a similarity matrix.

From files, each row is one query: `prediction` is the ranked list of retrieved ids (best
first), `references` the ids that are relevant. A query's rank is the best rank over its
relevant ids (1-based), so an image with 5 captions counts as found at the first of them.
"""

from __future__ import annotations

import math

from peftvlm.metrics import mean, register

RECALL_KS = (1, 5, 10)


def best_rank(ranking: list, relevant: list) -> int | None:
    """1-based position of the first relevant id in `ranking`, or None if none is retrieved."""
    wanted = set(relevant)
    return next((i for i, item in enumerate(ranking, 1) if item in wanted), None)


def average_precision(ranking: list, relevant: list) -> float:
    """Mean of precision@i over the positions i of relevant ids, divided by all relevant ids
    (relevant ids never retrieved count as precision 0)."""
    wanted, hits, total = set(relevant), 0, 0.0
    for i, item in enumerate(ranking, 1):
        if item in wanted:
            hits += 1
            total += hits / i
            wanted.discard(item)  # a duplicate id in the ranking counts once
    return total / len(set(relevant)) if relevant else 0.0


def ndcg_at_k(ranking: list, relevant: list | dict, k: int = 10) -> float:
    """NDCG@k with gains 1 per relevant id (or the given {id: gain}), log2(i+1) discounts."""
    gains = dict(relevant) if isinstance(relevant, dict) else {r: 1.0 for r in relevant}
    dcg, seen = 0.0, set()
    for i, item in enumerate(ranking[:k], 1):
        if item not in seen:
            dcg += gains.get(item, 0.0) / math.log2(i + 1)
            seen.add(item)
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_ks(ranks: list[int | None], ks=RECALL_KS, prefix: str = "recall") -> dict:
    """`{prefix}@k`: fraction of queries whose best rank is <= k."""
    return {f"{prefix}@{k}": mean([float(r is not None and r <= k) for r in ranks]) for k in ks}


def recall(predictions: list[list], references: list[list]) -> dict[str, float]:
    """Recall@1/5/10 over queries (best rank over each query's relevant ids)."""
    return recall_at_ks([best_rank(p, r) for p, r in zip(predictions, references)])


def mrr(predictions: list[list], references: list[list]) -> dict[str, float]:
    """Mean reciprocal rank of the first relevant id (0 when none is retrieved)."""
    ranks = [best_rank(p, r) for p, r in zip(predictions, references)]
    return {"mrr": mean([1.0 / r if r else 0.0 for r in ranks])}


def mean_average_precision(predictions: list[list], references: list[list]) -> dict[str, float]:
    """mAP: mean over queries of average precision."""
    return {"map": mean([average_precision(p, r) for p, r in zip(predictions, references)])}


def ndcg(predictions: list[list], references: list[list], k: int = 10) -> dict[str, float]:
    """Mean NDCG@10 over queries (binary relevance)."""
    return {f"ndcg@{k}": mean([ndcg_at_k(p, r, k) for p, r in zip(predictions, references)])}


def _ranks_from_scores(scores, targets: list[list[int]]) -> list[int]:
    """Best 1-based rank of any target column in each row of `scores` (numpy 2-D); a target
    tied with other candidates takes the best position among them (1 + #strictly greater)."""
    ranks = []
    for row, cols in zip(scores, targets):
        best = max(row[c] for c in cols)
        ranks.append(1 + int((row > best).sum()))
    return ranks


def cross_modal_ranks(similarity, text_to_image: list[int]) -> tuple[list[int], list[int]]:
    """(image->text, text->image) best 1-based ranks from an (images x texts) similarity matrix,
    where text j describes image `text_to_image[j]`: an image is found at the best rank of any
    of its texts (COCO/Flickr30k protocol)."""
    import numpy as np

    sim = np.asarray(similarity, dtype=np.float64)
    texts_of: list[list[int]] = [[] for _ in range(sim.shape[0])]
    for j, i in enumerate(text_to_image):
        texts_of[i].append(j)
    return (_ranks_from_scores(sim, texts_of),
            _ranks_from_scores(sim.T, [[i] for i in text_to_image]))


def cross_modal_recall(similarity: list[list[float]], text_to_image: list[int],
                       ks=RECALL_KS) -> dict[str, float]:
    """Image->text and text->image Recall@K (see `cross_modal_ranks`). Also returns `rsum`,
    the sum of all six recalls x100."""
    i2t_ranks, t2i_ranks = cross_modal_ranks(similarity, text_to_image)
    i2t = recall_at_ks(i2t_ranks, ks, "image_to_text_recall")
    t2i = recall_at_ks(t2i_ranks, ks, "text_to_image_recall")
    return {**i2t, **t2i, "rsum": 100.0 * (sum(i2t.values()) + sum(t2i.values()))}


def mean_ranks(i2t_ranks: list[int], t2i_ranks: list[int]) -> dict[str, float]:
    """Mean best rank in each direction (1 = always first; lower is better)."""
    return {"image_to_text_mean_rank": mean([float(r) for r in i2t_ranks]),
            "text_to_image_mean_rank": mean([float(r) for r in t2i_ranks])}


_KW = {"higher_is_better": True, "prediction": "ranking", "reference": "ids"}
register("recall", recall, summary="Recall@1/5/10 (best rank over relevant ids)", **_KW)
register("mrr", mrr, summary="mean reciprocal rank of the first relevant id", **_KW)
register("map", mean_average_precision, summary="mean average precision", **_KW)
register("ndcg", ndcg, summary="NDCG@10, binary relevance", **_KW)
