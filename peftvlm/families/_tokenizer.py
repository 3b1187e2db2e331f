"""A small byte-level BPE tokenizer trained in-process, for the built-in tiny models.

Nothing can be downloaded here, so tiny models ship a tokenizer made from a fixed corpus: the
words our synthetic tasks and templates use, so they tokenize into few pieces.
"""

from __future__ import annotations

import itertools

WORDS = (
    "what color is the shape red green blue yellow orange purple white black circle square "
    "triangle a an of in on at to and or it this that image picture photo describe detail "
    "question answer using single word phrase where which how many there are left right top "
    "bottom center object box region one two three four five yes no user assistant system "
    "shows depicts contains with for is are was were be you your please short caption "
    "document text chart value number options option letter choose correct best class label "
    "instruction task generate write explain why because count small large big background"
).split()

BASE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def _corpus() -> list[str]:
    words = list(WORDS)
    sentences = [" ".join(words[i:i + 8]) for i in range(0, len(words), 3)]
    sentences += [f"{a} {b}." for a, b in itertools.product(words[:40], words[:12])]
    sentences += ["0123456789 0.25 0.5 [0.12, 0.34, 0.56, 0.78] (10,20),(300,400) A. B. C. D."]
    sentences += [s.capitalize() + "?" for s in sentences[:50]]
    return sentences


def build_tiny_tokenizer(extra_special_tokens=(), chat_template: str | None = None,
                         vocab_size: int = 600, **special_names):
    """Train a tiny BPE tokenizer; `special_names` maps roles (e.g. `eos_token`) to tokens.

    Defaults: pad `<pad>`, bos `<s>`, eos `</s>`, unk `<unk>`. Extra special tokens (image
    tokens, turn markers) are added after training so each stays one id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BASE_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    roles = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    roles.update(special_names)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    extra = [t for t in extra_special_tokens if t not in fast.get_vocab()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
