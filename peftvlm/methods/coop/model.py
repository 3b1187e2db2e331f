"""CoOp's learnable text context (Zhou et al. 2022, "Learning to Prompt for Vision-Language
Models", https://arxiv.org/abs/2109.01134).

Each class prompt is `[SOS] [V]_1 ... [V]_M [CLASS] . [EOS]` (class token at the end; `middle`
and `front` move it), where the M context vectors live in the text encoder's word-embedding
space and are the only trained tensors. The frozen text encoder then runs exactly as CLIP does
(position embeddings, causal mask, final layer norm, feature at the end-of-text token, text
projection).

Mechanism: we build the token ids of every class prompt with placeholder ids in the context
slots and let the model's own `get_text_features` run; a forward hook on the word-embedding
layer swaps the placeholder embeddings for the context vectors. This keeps transformers' text
forward (masking, pooling, attention kernels) instead of re-implementing it, and the hook is
attached only for the duration of one call, so the base model is never left modified.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from peftvlm.errors import RecipeError
from peftvlm.methods.dual_encoder.base import DualEncoderClassifier, text_length

CSC_NO_TRANSFER = ("method.csc: class-specific context is learned per class and cannot score "
                   "other classes")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after every text: CLIP `[SOS]` / `[EOS]`,
    SigLIP nothing / `</s>`. Read from the tokenizer itself, so no family is named here."""
    bare = _ids(tokenizer, ".")
    wrapped = tokenizer(".")["input_ids"]
    for i in range(len(wrapped) - len(bare) + 1):
        if wrapped[i:i + len(bare)] == bare:
            return wrapped[:i], wrapped[i + len(bare):]
    raise RecipeError("the tokenizer changes a text's own tokens when it adds special tokens; "
                      "CoOp cannot lay its prompts out with it")


def prompt_layout(tokenizer, n_ctx: int, name: str, position: str):
    """Token ids of one class prompt and the indices of its context slots.

    `prefix [V]_1..[V]_M name . suffix`, the prefix/suffix being what the tokenizer wraps every
    text in: with CLIP's `[SOS]`, the context follows the start token as in the paper; SigLIP
    has no start token, so the context opens the sequence. Slots hold a placeholder id (the
    start token, or unk: never the end token a text model may pool at); the hook replaces
    their embeddings.
    """
    prefix, suffix = special_wrapping(tokenizer)
    placeholder = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else tokenizer.unk_token_id)
    name_ids, period = _ids(tokenizer, " " + name), _ids(tokenizer, ".")
    half = n_ctx // 2
    if position == "end":
        body = [("ctx", n_ctx), ("name", name_ids)]
    elif position == "middle":
        body = [("ctx", half), ("name", name_ids), ("ctx", n_ctx - half)]
    else:
        body = [("name", name_ids), ("ctx", n_ctx)]
    ids, slots = list(prefix), []
    for kind, part in body:
        if kind == "ctx":
            slots += range(len(ids), len(ids) + part)
            ids += [placeholder] * part
        else:
            ids += part
    return ids + period + suffix, slots


class CoOpClassifier(DualEncoderClassifier):
    """CLIP whose class text features come from learned context + class-name tokens."""

    @property
    def text_encoder(self):
        """The frozen text model (a property, so it is not registered twice as a child)."""
        return self.model.get_submodule(self.family.language_module)

    def build_learned(self, classnames: list[str]) -> None:
        config = self.method_config
        embedding = self.text_encoder.get_input_embeddings()
        init_ids = _ids(self.tokenizer, config.ctx_init) if config.ctx_init else None
        self.n_ctx = len(init_ids) if init_ids else config.n_ctx
        n_sets = len(classnames) if config.csc else 1
        ctx = torch.empty(n_sets, self.n_ctx, embedding.embedding_dim,
                          dtype=embedding.weight.dtype, device=embedding.weight.device)
        if init_ids:
            # "a photo of a" -> those words' embeddings, so training starts at the prompt.
            ctx.copy_(embedding.weight.detach()[init_ids].expand_as(ctx))
        else:
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)

    @property
    def transfers_to_new_classes(self) -> bool:
        return not self.method_config.csc

    def set_classnames(self, classnames: list[str]) -> None:
        """Re-lay the class prompts; class-specific context cannot follow new classes."""
        trained = getattr(self, "classnames", None)
        if self.method_config.csc and trained is not None and list(classnames) != trained:
            raise RecipeError(CSC_NO_TRANSFER, hint="set method.csc=false for base-to-new "
                                                    "evaluation")
        self.classnames = list(classnames)
        layouts = [prompt_layout(self.tokenizer, self.n_ctx, name,
                                 self.method_config.class_token_position) for name in classnames]
        longest = max(len(ids) for ids, _ in layouts)
        fixed = text_length(self.model, self.family)
        if longest > self.text_encoder.config.max_position_embeddings:
            raise RecipeError(f"method.n_ctx: class prompts need {longest} tokens, more than the "
                              f"text encoder's {self.text_encoder.config.max_position_embeddings}",
                              hint="use fewer context tokens or shorter class names")
        pad = self.tokenizer.pad_token_id
        device = self.ctx.device
        length = fixed or longest  # SigLIP: max_length padding, pooled at the last position
        ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in layouts], device=device)
        # Max-length families are run without a mask, exactly as their hand-written prompts.
        mask = None if fixed else torch.tensor(
            [[1] * len(i) + [0] * (length - len(i)) for i, _ in layouts], device=device)
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_mask", mask, persistent=False)
        self.register_buffer("ctx_slots", torch.tensor([s for _, s in layouts], device=device),
                             persistent=False)

    @contextmanager
    def _context_inserted(self):
        def insert(_module, _inputs, embeds):
            rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None]
            ctx = self.ctx.expand(embeds.shape[0], -1, -1).to(embeds.dtype)
            return embeds.index_put((rows, self.ctx_slots), ctx)

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(insert)
        try:
            yield
        finally:
            handle.remove()

    def class_text_features(self):
        with self._context_inserted():
            return self.model.get_text_features(input_ids=self.prompt_ids,
                                                attention_mask=self.prompt_mask).pooler_output
