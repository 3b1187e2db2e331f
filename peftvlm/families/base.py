"""The declarative description of a model family: the only place that knows its quirks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

# A conversation: messages {"role": ..., "content": [{"type": "image", "image": PIL.Image} |
# {"type": "text", "text": str}, ...]} with roles system / user / assistant.
Conversation = list[dict]

TEMPLATES_DIR = Path(__file__).parent / "templates"


def read_template(name: str) -> str:
    """A chat template shipped in peftvlm/families/templates/ (`name` with or without .jinja):
    published templates the tiny twins carry, and any family's replacement template."""
    path = TEMPLATES_DIR / (name if name.endswith(".jinja") else f"{name}.jinja")
    return path.read_text(encoding="utf-8")


DEFAULT_LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("vision", "qformer", "projector", "detector", "language")



@dataclass(frozen=True)
class FamilySpec:
    """What peftvlm needs to know about one architecture family.

    Module names are dotted prefixes of `model.named_modules()` (transformers 5 layout); a part's
    LoRA targets are name suffixes inside that prefix (`attn.proj` where a bare `proj` would also
    hit a convolution).
    Conversations are rendered with the checkpoint's own chat template (the processor's); which
    tokens carry loss is derived from it (`peftvlm.data.render.chat_template`). A family deviates
    only as data: `chat_template` names a `.jinja` file in `peftvlm/families/templates/` that
    replaces the checkpoint's template at load time (for training, eval, preview and export
    alike); `end_of_turn` is the token a reply ends with (trained, and appended after the final
    reply where the template writes none). A family with no chat template at all (PaliGemma)
    sets the `encode` / `encode_prompt` hooks instead.

    Hooks (callables, so that importing a spec never imports transformers):
    - `processor_class()`: the ProcessorMixin subclass to load processors with instead of
      AutoProcessor: `family.processor_class().from_pretrained(path, revision=...)`. Qwen2-VL
      sets it: its stock processor needs a torchvision-backed video processor.
    - `encode(processor, conversations)`: training inputs for a batch of full conversations
      (images inside the content items), replacing the generic path
      `ConversationCollator.encode` (chat template + derived reply mask). It returns the
      model's inputs plus `labels`: -100 everywhere but the replies and their end-of-turn.
    - `encode_prompt(processor, prompts)`: left-padded inputs for `model.generate`, where each
      prompt is a conversation up to its last user turn (no answer), replacing the generic
      `apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, ...)`. New tokens
      are `output[:, batch["input_ids"].shape[1]:]`.
    - `decode(processor, output, batch)`: the answer texts of `generate`'s output, replacing
      the generic decode of the new tokens with special tokens skipped (Florence-2: an
      encoder-decoder whose output is all new, and whose box tokens are special tokens).
    """

    name: str
    model_types: tuple[str, ...]
    kind: Literal["generative", "dual_encoder", "detector"] = "generative"
    vision_module: str = "model.vision_tower"
    projector_module: str | None = "model.multi_modal_projector"
    language_module: str | None = "model.language_model"
    language_targets: tuple[str, ...] = DEFAULT_LM_TARGETS
    vision_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    projector_targets: tuple[str, ...] = ("linear_1", "linear_2")
    # BLIP-2's Q-Former between the vision tower and the projector; None elsewhere.
    qformer_module: str | None = None
    qformer_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    # An open-vocabulary detector's fusion and query-decoder layers (Grounding DINO); None
    # elsewhere.
    detector_module: str | None = None
    detector_targets: tuple[str, ...] = ()
    image_token: str | None = "<image>"
    # The other special tokens that stand for or frame an image / video in the text the
    # processor reads (Qwen's `<|vision_start|>`, Gemma 3's `<start_of_image>`...). Typed in a
    # row's text, these and `image_token` would be read as media: such rows are bad rows
    # (`media_token_in_text`). Tests check the list against what each processor writes.
    media_tokens: tuple[str, ...] = ()
    # Whether rows may carry `videos` (`{"type": "video"}` items): the processor the family
    # loads must turn frame arrays into the model's video inputs (see qwen2_vl.py).
    takes_video: bool = False
    # Why a family that does not take video refuses rows with videos (said at data time), or None.
    video_refusal: str | None = None
    # Why every clip must have the same number of frames (the model stacks a batch's clips into
    # one tensor: LLaVA-OneVision), or None; uneven clips stop before training, naming
    # `data.video_num_frames`.
    uniform_video_frames: str | None = None
    # Whether the training chat template renders images where they stand among the text
    # (interleaved); False: it puts a turn's images before its text (llava-1.5's template).
    interleaved_images: bool = True
    # A template file in peftvlm/families/templates/ used INSTEAD of the checkpoint's own
    # (None: the checkpoint's template is the source of truth).
    chat_template: str | None = None
    end_of_turn: str | None = None
    # A token a reply's labels begin with where the checkpoint was trained that way (Florence-2:
    # `<s>`, from its tokenizer's own `<s>answer</s>`); "" for chat-template families.
    start_of_reply: str = ""
    # The box convention grounding data is written in and eval parses answers with: a name in
    # `peftvlm.data.boxes.CONVENTIONS` (writer + parser + coordinate grid, with its source).
    # Families whose checkpoints publish no convention use `norm1` (docs/grounding.md).
    box_format: str = "norm1"
    tiny_name: str | None = None
    # The Hub checkpoint the tiny twin stands for: the twin carries its published chat template,
    # kept as tests/fixtures/chat_templates/<basename>.jinja and checked by the parity tests.
    reference_checkpoint: str | None = None
    build_tiny: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)
    # Hooks for families the generic paths do not fit; None = the generic path (see above).
    processor_class: Callable[[], type] | None = field(default=None, compare=False, repr=False)
    # `model_class()`: the transformers class to load weights with instead of the Auto class of
    # the family's kind (a detector's task head: GroundingDinoForObjectDetection).
    model_class: Callable[[], type] | None = field(default=None, compare=False, repr=False)
    encode: Callable[[Any, list[Conversation]], dict] | None = field(
        default=None, compare=False, repr=False)
    encode_prompt: Callable[[Any, list[Conversation]], dict] | None = field(
        default=None, compare=False, repr=False)
    decode: Callable[[Any, Any, dict], list[str]] | None = field(
        default=None, compare=False, repr=False)
    # What a conversation may hold: (min, max) images (None = any; BLIP-2 reads exactly one),
    # and whether a system message may sit next to an image (Llama 3.2 Vision's template
    # raises on that). Rows outside these are bad rows (`data.on_bad_row`), not a crash.
    images_per_row: tuple[int, int] | None = None
    system_with_images: bool = True
    # Methods this family refuses at `validate` time: (method name, reason) pairs.
    refused_methods: tuple[tuple[str, str], ...] = ()
    # Training objectives (`train.objective`: dpo, grpo) this family refuses at `validate`
    # time: (objective name, reason) pairs (peftvlm/trainers/objectives/).
    refused_objectives: tuple[tuple[str, str], ...] = ()
    # GRPO on a family with no chat template (its `encode_prompt` builds prompts by hand): a
    # `.jinja` in peftvlm/families/templates/ that renders a prompt conversation as the text
    # `encode_prompt` gives the processor, for TRL's GRPOTrainer (which renders rollout prompts
    # with the processor's chat template). None: the processor's own template.
    rollout_template: str | None = None
    # A prefix-LM family's `token_type_ids` value for the answer (PaliGemma: the prompt is 0,
    # attended bidirectionally, the answer 1, causal), or None where token types mark media.
    # TRL gives generated tokens type 0, which would put them in the bidirectional prefix.
    answer_token_type: int | None = None
    # Dual encoders (CLIP-family methods). `text_padding`: "longest" (CLIP pools the end-of-text
    # token, so padding length is irrelevant) or "max_length" (SigLIP pools the last position:
    # texts must be padded to the text encoder's max_position_embeddings, as in training).
    text_padding: Literal["longest", "max_length"] = "longest"
    # Whether the vision transformer starts with a CLS token that carries the image feature
    # (CLIP); SigLIP pools every token with an attention head instead.
    vision_cls_token: bool = True
    # Whether class logits add the model's learned `logit_bias` (SigLIP's sigmoid scoring).
    logit_bias: bool = False
    # Dotted path in the model config to the joint embedding width.
    joint_dim_config: str = "projection_dim"
    # Planning and mixed batches (`peftvlm plan`, `peftvlm.data.batch.mixed`):
    # `image_tokens(image_inputs, config) -> (tokens, patches)`: for ONE image as the family's
    # image processor returns it (NumPy arrays), the tokens it takes in the language model's
    # sequence and the patches its vision tower runs over. None: plan cannot count images.
    image_tokens: Callable[[dict, Any], tuple[int, int]] | None = field(
        default=None, compare=False, repr=False)
    # The blank image that text-only batches carry under several processes (zero-weighted, so
    # every rank runs the vision tower): its side, and image-processor settings for it.
    dummy_image_side: int = 28
    dummy_image_options: tuple[tuple[str, Any], ...] = ()
    # Why a text-only batch cannot carry that blank image (it then trains without one), or None.
    dummy_image_refusal: str | None = None
    # Why this family cannot train on packed rows (`train.packing`), or None when its attention
    # is isolated per conversation by restarting `position_ids` (transformers builds the
    # block-diagonal mask from them on CPU/SDPA, and flash-attention's varlen path on GPU).
    packing_refusal: str | None = None
    # Why TRL's fused LM head (SFTTrainer projects the backbone's `last_hidden_state` itself)
    # cannot run on this family's forward, or None; training then derives the same per-token
    # outputs from the model's own logits (`peftvlm.trainers.lm_head`).
    unfused_lm_head: str | None = None
    # Why this family trains on the model's own loss (its forward given `labels`) rather than
    # TRL's fused LM head, or None. An encoder-decoder's (Florence-2's) labels are shifted into
    # its decoder's inputs; the fused head shifts them as a causal LM's instead.
    own_loss: str | None = None
    # `packed_positions(model, batch) -> (k, rows, tokens)`: for a family whose rotary
    # positions are not just token order (Qwen-VL's 3-D M-RoPE), each row's own positions as
    # the model computes them for the right-padded training `batch`; packing lays them end to
    # end behind the text positions (transformers' (1 + k, rows, tokens) `position_ids`).
    packed_positions: Callable[[Any, dict], Any] | None = field(
        default=None, compare=False, repr=False)

    @property
    def loss_head(self) -> Literal["fused", "logits", "own"]:
        """How training computes this family's loss: TRL's fused LM head, the loss from the
        model's logits (`unfused_lm_head`: `peftvlm.trainers.lm_head`), or the model's own."""
        if self.own_loss:
            return "own"
        return "logits" if self.unfused_lm_head else "fused"

    @property
    def is_generative(self) -> bool:
        """A generative VLM (image + text in, text out), loaded with AutoModelForImageTextToText."""
        return self.kind == "generative"

    @property
    def is_dual_encoder(self) -> bool:
        """A dual encoder (CLIP, SigLIP): image and text features in one space, no generation."""
        return self.kind == "dual_encoder"

    @property
    def is_detector(self) -> bool:
        """An open-vocabulary detector (Grounding DINO): image + class names in, boxes out."""
        return self.kind == "detector"

    def joint_dim(self, config) -> int:
        """The width of the joint image-text feature space of a dual encoder."""
        for name in self.joint_dim_config.split("."):
            config = getattr(config, name)
        return int(config)

    def chat_template_override(self) -> str | None:
        """The text of the family's replacement chat template, or None to use the checkpoint's."""
        return read_template(self.chat_template) if self.chat_template else None

    def module_prefix(self, part: str) -> str | None:
        """The module prefix of a part: `vision`, `qformer`, `projector`, `detector` or
        `language`."""
        return {"vision": self.vision_module, "qformer": self.qformer_module,
                "projector": self.projector_module, "detector": self.detector_module,
                "language": self.language_module}[part]

    def part_targets(self, part: str) -> tuple[str, ...]:
        """The linear-layer names LoRA targets by default inside a part; `""` is the part's
        module itself (Llama 3.2 Vision's and BLIP-2's projectors are one Linear); `()` means
        the part has no linear layer to adapt (Gemma 3's projector is a bare weight)."""
        return {"vision": self.vision_targets, "qformer": self.qformer_targets,
                "projector": self.projector_targets, "detector": self.detector_targets,
                "language": self.language_targets}[part]

    def parts(self) -> tuple[str, ...]:
        """The parts this family has, in model order."""
        return tuple(p for p in PARTS if self.module_prefix(p))

    def row_problem(self, messages: list[dict]) -> str | None:
        """Why this family cannot take a conversation (a reason key), or None."""
        images = sum(c.get("type") == "image" for m in messages for c in m["content"]
                     if isinstance(m["content"], list))
        if self.images_per_row and not self.images_per_row[0] <= images <= self.images_per_row[1]:
            low, high = self.images_per_row
            return f"{self.name}_needs_{low}_image" if low == high else f"{self.name}_image_count"
        if not self.system_with_images and images and any(m["role"] == "system"
                                                           for m in messages):
            return f"{self.name}_system_prompt_with_image"
        return None

    def literal_media_tokens(self) -> tuple[str, ...]:
        """`image_token` and `media_tokens`: the special tokens a row's text must not hold."""
        return tuple(dict.fromkeys(t for t in (self.image_token, *self.media_tokens) if t))

    def refusal(self, method_name: str) -> str | None:
        """Why this family cannot take `method_name`, or None."""
        return dict(self.refused_methods).get(method_name)

    def objective_refusal(self, objective: str) -> str | None:
        """Why this family cannot train with `objective` (dpo, grpo), or None."""
        return dict(self.refused_objectives).get(objective)

    def quantization_skip_modules(self) -> list[str]:
        """Full prefixes kept in full precision by QLoRA (transformers matches them as prefixes)."""
        kept = (self.vision_module, self.qformer_module, self.projector_module)
        return [m for m in kept if m] + ["lm_head"]
