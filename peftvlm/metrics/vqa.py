"""VQA accuracy (as the official VQA evaluation computes it), exact match, and ANLS (DocVQA).

VQA accuracy follows `vqaEval.py` of the official VQA API (GT-Vision-Lab/VQA, Python 3
version): the prediction is always normalised (punctuation, then number words, articles and
contractions); the ground-truth answers get only the punctuation step, and only when they
disagree among themselves (VQA answers are already normalised when they all agree). Each of the
N (usually 10) ground-truth answers then scores min(1, matches among the other N-1 / 3), and the
question's accuracy is the mean of those N values.
"""

from __future__ import annotations

import re
from collections import defaultdict

from peftvlm.metrics import mean, register

# The official tables, verbatim (including entries that can never match after lower-casing,
# such as "Im"): results must be identical to the reference implementation.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]
# Both regexes are the official ones. "(?!<=\d)" is a no-op lookahead (the authors meant a
# lookbehind), so a period is removed unless a digit follows it: "2.5" stays, "2." -> "2".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code passes re.UNICODE (== 32) where `sub` expects `count`, so at most 32
# periods are removed per answer; we keep that limit to stay identical.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official punctuation step: a mark touching a space (or any text with a digit-comma-
    digit group) is deleted, otherwise it becomes a space; then periods not before a digit go."""
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if strip_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words -> digits, drop articles, and restore
    apostrophes in contractions ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full VQA normalisation (what the official code applies to every prediction)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_question_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy of one prediction against its ground-truth answers, as vqaEval.py computes it."""
    pred = normalize_answer(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    # For answer i, "the other N-1" answers match `total - matches[i]` times.
    return mean([min(1.0, (total - m) / 3) for m in matches])


def _by_type(values: list[float], types: list[str | None] | None, prefix: str) -> dict:
    if not types:
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for value, qtype in zip(values, types):
        if qtype is not None:
            groups[str(qtype)].append(value)
    return {f"{prefix}/{t}": mean(v) for t, v in sorted(groups.items())}


# VQA collects 10 human answers per question; the leave-one-out formula assumes them. With N
# answers a unanimous correct prediction scores min(1, (N-1)/3): below 4 answers it can never
# reach 1.0 (one answer: 0.0), so such rows fall back to exact match (see `reference_note`).
OFFICIAL_ANSWERS, MIN_LEAVE_ONE_OUT = 10, 4


def row_accuracy(prediction: str, answers: list[str]) -> float:
    """`vqa_question_accuracy`, or, with fewer than MIN_LEAVE_ONE_OUT answers, 1.0 when the
    prediction equals one of them after VQA normalisation (exact match)."""
    if len(answers) >= MIN_LEAVE_ONE_OUT:
        return vqa_question_accuracy(prediction, answers)
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


def reference_note(predictions: list[str], references: list[list[str]]) -> str | None:
    """What VQA accuracy means on these rows when some have fewer than 10 answers."""
    fewer = [len(r) for r in references if len(r) < OFFICIAL_ANSWERS]
    if not fewer:
        return None
    fallback = sum(n < MIN_LEAVE_ONE_OUT for n in fewer)
    return (f"{len(fewer)} of {len(references)} rows have fewer than {OFFICIAL_ANSWERS} "
            f"reference answers (fewest: {min(fewer)}); VQA accuracy is defined over "
            f"{OFFICIAL_ANSWERS} human answers, so these scores are not comparable with "
            "published VQAv2 numbers. "
            + (f"{fallback} row(s) with fewer than {MIN_LEAVE_ONE_OUT} answers were scored as "
               "exact match (leave-one-out cannot reach 1.0 there: with one answer a correct "
               "prediction would score 0.0); " if fallback else "")
            + (f"{len(fewer) - fallback} row(s) with the official formula over their N "
               "answers." if len(fewer) > fallback else "").strip())


def vqa_accuracy(predictions: list[str], references: list[list[str]],
                 question_types: list[str | None] | None = None) -> dict[str, float]:
    """Mean VQA accuracy, plus `vqa_accuracy/<type>` for each question type when given; rows
    with fewer than 4 answers are scored as exact match (see `reference_note`)."""
    per_q = [row_accuracy(p, r) for p, r in zip(predictions, references)]
    return {"vqa_accuracy": mean(per_q), **_by_type(per_q, question_types, "vqa_accuracy")}


def exact_match(predictions: list[str], references: list[list[str]],
                question_types: list[str | None] | None = None) -> dict[str, float]:
    """Fraction of predictions equal to any reference after full VQA normalisation of both."""
    per_q = [float(normalize_answer(p) in {normalize_answer(r) for r in refs})
             for p, refs in zip(predictions, references)]
    return {"exact_match": mean(per_q), **_by_type(per_q, question_types, "exact_match")}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_score(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction: max over answers of 1 - NL, where NL is the edit distance over
    the longer length (case- and whitespace-insensitive); NL >= threshold scores 0."""
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        gt = _anls_text(answer)
        longest = max(len(pred), len(gt))
        nl = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(predictions: list[str], references: list[list[str]],
         question_types: list[str | None] | None = None) -> dict[str, float]:
    """Average Normalized Levenshtein Similarity (DocVQA, threshold 0.5)."""
    per_q = [anls_score(p, r) for p, r in zip(predictions, references)]
    return {"anls": mean(per_q), **_by_type(per_q, question_types, "anls")}


_TYPES = {"question_type": "question_types"}
register("vqa_accuracy", vqa_accuracy, higher_is_better=True, extras=_TYPES,
         validity=reference_note,
         summary="VQA accuracy: min(1, #matching humans/3) averaged over the 10 leave-one-out "
                 "subsets, official normalisation (exact match below 4 answers, noted)")
register("exact_match", exact_match, higher_is_better=True, extras=_TYPES,
         summary="prediction equals a reference after VQA normalisation")
register("anls", anls, higher_is_better=True, extras=_TYPES,
         summary="Average Normalized Levenshtein Similarity (DocVQA, threshold 0.5)")
