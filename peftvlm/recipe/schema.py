"""The recipe schema (pydantic v2): every section of a recipe, with its defaults documented once,
here, in field descriptions. Unknown keys are errors at any depth.

This module must not import torch: `peftvlm validate` runs on it alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, field_validator, model_validator

from peftvlm._schema import Section
from peftvlm.families import tiny_models
from peftvlm.registry import method_config_classes
from peftvlm.rewards import options_of, reward_names


class QuantizationConfig(Section):
    bits: Literal[4, 8] = Field(4, description="Weight precision of the quantized modules.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Matmul dtype of 4-bit layers; auto = bfloat16 on GPU, float32 on CPU.")
    skip_modules: list[str] | None = Field(
        None, description="Module prefixes kept in full precision; default: the family's vision "
                          "tower, projector and lm_head (the language model alone is quantized).")


class ModelConfig(Section):
    id: str = Field(..., description="Hub id, local folder, or a built-in tiny model "
                                     f"({', '.join(tiny_models())}).")
    family: str | None = Field(None, description="Model family; default: read from the config's "
                                                 "model_type (see `peftvlm ls families`).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub repo. Off "
                                                       "unless you trust the repo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a GPU that supports it, else float32.")
    quantization: QuantizationConfig | None = Field(
        None, description="bitsandbytes quantization of the base (QLoRA sets 4-bit nf4 by default).")


# Row formats (peftvlm/data/read/formats.py) and annotation layouts (peftvlm/data/read/readers.py).
# Preference formats (chosen vs rejected replies, peftvlm/data/read/preference.py) are row
# formats too.
RowFormat = Literal["auto", "messages", "openai_messages", "llava_conversations",
                    "llamafactory_v1", "trl_preference", "rlaifv", "llamafactory_ranking",
                    "swift_rejected_response", "trl_prompt"]
SourceFormat = Literal["auto", "messages", "openai_messages", "llava_conversations",
                       "llamafactory_v1", "trl_preference", "rlaifv", "llamafactory_ranking",
                       "swift_rejected_response", "trl_prompt", "coco_captions",
                       "coco_instances", "yolo", "vqav2"]


FORMAT_ALIASES = {"sharegpt": "llava_conversations", "openai": "openai_messages",
                  "llama_factory_v1": "llamafactory_v1", "trl": "trl_preference",
                  "rlaif_v": "rlaifv", "swift": "swift_rejected_response",
                  "llama_factory_ranking": "llamafactory_ranking"}


def _format_name(value: Any) -> Any:
    """`llava-conversations` and `llava_conversations` name the same format (so do sharegpt and
    openai, the names other tools use)."""
    if not isinstance(value, str):
        return value
    value = value.replace("-", "_")
    return FORMAT_ALIASES.get(value, value)


class SourceConfig(Section):
    path: str | None = Field(None, description="JSONL/JSON/CSV/TSV/Parquet file, image folder "
                                               "(one subfolder per class) or saved `datasets` "
                                               "folder, relative to the recipe file.")
    dataset: str | None = Field(None, description="A `datasets` Hub id (load_dataset) or a folder "
                                                  "saved with save_to_disk (load_from_disk).")
    split: str = Field("train", description="Split to read, with slicing (`train[:1000]`, "
                                            "`train[10%:20%]`).")
    streaming: bool = Field(False, description="Training source: read it as a stream, rows "
                                               "rendered as training reads them (bounded "
                                               "memory; needs train.max_steps; docs/"
                                               "streaming.md): .jsonl, .parquet, WebDataset "
                                               ".tar shards (globs allowed in path) or a "
                                               "`dataset:`. Held-out `dataset:` source: read "
                                               "lazily up to max_samples.")
    format: SourceFormat = Field(
        "auto", description="How the source is laid out. auto: detected (a JSON with `images` + "
                            "`annotations` lists is COCO captions; rows with `conversations` "
                            "are llava_conversations, with `messages` messages or, with OpenAI "
                            "`image_url` items, openai_messages; with `value` items, "
                            "llamafactory_v1). Annotation layouts: "
                            "coco_captions, coco_instances and yolo (detection: a COCO "
                            "instances JSON; a folder with images/ + labels/), vqav2 (path = "
                            "questions file, `annotations` = "
                            "annotations file). Row formats (forced): messages, openai_messages, "
                            "llava_conversations, llamafactory_v1 (docs/data.md); preference rows "
                            "(chosen vs rejected, for train.objective: dpo): trl_preference, "
                            "rlaifv, llamafactory_ranking, swift_rejected_response "
                            "(docs/objectives.md); trl_prompt (TRL's GRPO rows: prompt, "
                            "images and a reference column such as solution). Default: "
                            "data.format.")

    _format_names = field_validator("format", mode="before")(
        classmethod(lambda cls, v: _format_name(v)))
    annotations: str | None = Field(None, description="vqav2: the annotations file, relative to "
                                                      "the recipe.")
    image_root: str | None = Field(None, description="Folder that image paths are relative to "
                                                     "(and must stay inside); default: the data "
                                                     "file's folder.")
    image_pattern: str | None = Field(None, description="vqav2: image file from image_id; default "
                                                        "`{data_subtype}/COCO_{data_subtype}_"
                                                        "{image_id:012d}.jpg`.")
    weight: float = Field(1.0, gt=0, description="Mixing weight among several training sources: "
                                                 "when any source sets one, source i gets "
                                                 "total_rows * weight_i / sum(weights) rows "
                                                 "(sampled down or repeated, seeded); "
                                                 "streamed: each row comes from source i "
                                                 "with probability weight_i / sum(weights).")
    template: str | None = Field(None, description="Data template that turns annotations into "
                                                   "conversations (`peftvlm ls templates`, or a "
                                                   "YAML path); default: data.template; none = "
                                                   "rows have `messages`.")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Template column -> column in this source.")
    template_options: dict[str, Any] = Field(default_factory=dict,
                                             description="Options of this source's template "
                                                         "(over data.template_options).")
    max_samples: int | None = Field(None, gt=0, description="Keep at most this many rows.")

    @field_validator("dataset")
    @classmethod
    def _one_location(cls, v, info):
        if v is not None and info.data.get("path") is not None:
            raise ValueError("give either `path` or `dataset`, not both")
        return v


class SyntheticConfig(Section):
    name: Literal["colour-vqa", "colour-preference", "colour-classes", "coco-captions", "vqav2",
                  "refcoco", "coco-instances"] = Field(
        "colour-vqa", description="Built-in offline task: `colour-vqa` (What color is the "
                                  "shape? -> red/green/blue/yellow), `colour-preference` (the "
                                  "same as preference rows: the right colour chosen, another "
                                  "rejected), `colour-classes` (labels), or "
                                  "annotation files in public layouts rendered by data.template: "
                                  "`coco-captions`, `vqav2`, `refcoco` (boxes), "
                                  "`coco-instances` (detection: COCO instances JSON).")
    train_size: int = Field(2000, gt=0, description="Training rows to generate.")
    eval_size: int = Field(100, gt=0, description="Held-out rows to generate.")
    image_size: int = Field(32, gt=0, description="Side of the generated square images.")
    seed: int = Field(0, description="Seed of the generator.")


class FilterConfig(Section):
    """CLIP-score filtering of the training pairs (`peftvlm data filter RECIPE`)."""

    clipscore: float = Field(..., ge=0, le=2.5, description="Keep image-text pairs whose "
                             "CLIPScore (2.5 x max(cos, 0), Hessel et al. 2021) is at least this; "
                             "LAION's cosine 0.28 is 0.7.")
    model: str | None = Field(None, description="CLIP model that scores (Hub id, folder or "
                                                "tiny name); default: the recipe's model.")
    batch_size: int = Field(64, ge=1, description="Images scored per batch.")
    output: str | None = Field(None, description="Folder of the scores and the kept pairs; "
                                                 "default: runs/<recipe name>-filtered. "
                                                 "Training then reads its kept pairs.")


def _as_sources(value: Any) -> Any:
    if value is None or isinstance(value, list):
        return value
    return [{"path": value} if isinstance(value, str) else value]


class DataConfig(Section):
    train: list[SourceConfig] | None = Field(None, description="Training data: a path, a source, "
                                                               "or a list of sources.")
    eval: list[SourceConfig] | None = Field(None, description="Held-out data for `eval` metrics.")
    synthetic: SyntheticConfig | None = Field(None, description="Generate a built-in offline task "
                                                                "instead of reading files.")
    template: str | None = Field(None, description="Default data template for every source "
                                                   "(`peftvlm ls templates`, or a YAML path).")
    template_options: dict[str, Any] = Field(default_factory=dict,
                                             description="Template options for every source "
                                                         "(e.g. answer_selection: all_weighted).")
    system_prompt: str | None = Field(None, description="System message prepended to every "
                                                        "conversation.")
    format: RowFormat = Field(
        "auto", description="Row format of every source whose own `format` is auto: auto "
                            "(detected per source and reported by `data stats`), messages, "
                            "openai_messages, llava_conversations or llamafactory_v1 "
                            "(docs/data.md).")
    video_fps: float | None = Field(
        2.0, gt=0, description="Frames sampled per second of a video file (`videos` field); "
                               "None = every frame. Frame folders are used frame by frame, "
                               "taken as sampled at this rate (or at a row's own "
                               "`{\"path\", \"fps\"}`).")
    video_max_frames: int = Field(
        16, ge=1, description="At most this many frames per video, sampled evenly.")
    video_num_frames: int | None = Field(
        None, ge=1, description="Exactly this many frames per video, spread evenly over the "
                                "whole clip (frames repeat in a shorter one), instead of "
                                "video_fps / video_max_frames (transformers' `num_frames`). "
                                "LLaVA-OneVision needs it when clips differ in length.")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip", description="Bad rows (missing image, empty answer...): skip and count, or stop.")
    on_overflow: Literal["drop", "error"] = Field(
        "drop", description="Rows longer than train.max_length: drop and count, or stop.")
    seed: int = Field(0, description="Seed for phrasing choice, mixing, shuffling and "
                                     "few-shot sampling.")
    num_proc: int | None = Field(None, gt=0, description="Processes for preprocessing large "
                                                         "sources (rendering, image checks).")
    cache: bool = Field(True, description="Cache preprocessed large sources (fingerprinted by "
                                          "files, template and options) so re-runs skip it.")
    streaming: bool = Field(False, description="Stream every training source (as each "
                                               "source's `streaming`; docs/streaming.md).")
    # Image classification (CLIP-family methods: coop, vpt, clip_adapter).
    classnames: list[str] | None = Field(
        None, description="Class names in label order (classification). Default: the sorted "
                          "labels found in the data. With `colour-classes`, a subset of "
                          "red/green/blue/yellow.")
    shots: int | None = Field(None, ge=1, description="Few-shot: training images per class, "
                                                      "sampled with data.seed; default: all.")
    prompt_templates: list[str] = Field(
        default_factory=lambda: ["a photo of a {}."],
        description="Hand-written prompts for zero-shot class features; `{}` is the class name; "
                    "features of several templates are averaged.")
    filter: FilterConfig | None = Field(None, description="Train on the pairs of data.train "
                                        "that pass a CLIP-score threshold (written by "
                                        "`peftvlm data filter`).")
    base_to_new: bool = Field(False, description="Train on the first half of the classes (base) "
                                                 "and report accuracy on base and new classes "
                                                 "and their harmonic mean.")

    def streams(self) -> bool:
        """Whether training reads its sources as a stream (here or on any training source)."""
        return bool(self.streaming or any(s.streaming for s in self.train or []))

    _coerce_train = field_validator("train", "eval", mode="before")(
        classmethod(lambda cls, v: _as_sources(v)))
    _format_names = field_validator("format", mode="before")(
        classmethod(lambda cls, v: _format_name(v)))

    @field_validator("prompt_templates")
    @classmethod
    def _templates_name_the_class(cls, v):
        if not v:
            raise ValueError("give at least one template, e.g. 'a photo of a {}.'")
        for template in v:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain `{{}}` exactly once")
        return v


class RewardSpec(Section):
    """One entry of `train.rewards` (objective grpo): a built-in reward from peftvlm.metrics,
    or `custom` (a function in a Python file; needs train.allow_custom_rewards)."""

    name: str = Field(..., description="Reward: exact_match, vqa_accuracy, anls, rouge_l, "
                                       "cider_d, iou, box_accuracy, detection_map50, format, "
                                       "length, or custom (docs/objectives.md).")
    weight: float = Field(1.0, description="Its weight in the summed reward (TRL's "
                                           "reward_weights).")
    threshold: float | None = Field(None, gt=0, le=1, description="box_accuracy: the IoU that "
                                                                  "counts as a hit (0.5).")
    pattern: str | None = Field(None, description="format: a regular expression the whole reply "
                                                  "must match; default: the reply holds a box in "
                                                  "the family's convention.")
    max_words: int | None = Field(None, ge=1, description="length: replies up to this many "
                                                          "words score 1.")
    path: str | None = Field(None, description="custom: the Python file, relative to the recipe.")
    function: str | None = Field(None, description="custom: the function's name in that file: "
                                                   "f(prompts, completions, **columns) -> "
                                                   "list[float].")

    @field_validator("name")
    @classmethod
    def _known_reward(cls, v):
        if v not in reward_names():
            raise ValueError(f"unknown reward {v!r}; available rewards: "
                             f"{', '.join(reward_names())}")
        return v

    @model_validator(mode="after")
    def _options_of_this_reward(self):
        given = [k for k in ("threshold", "pattern", "max_words", "path", "function")
                 if getattr(self, k) is not None]
        wrong = [k for k in given if k not in options_of(self.name)]
        if wrong:
            raise ValueError(f"reward {self.name!r} takes no {', '.join(wrong)} (it reads: "
                             f"{', '.join(options_of(self.name)) or 'only name and weight'})")
        if self.name == "custom" and not (self.path and self.function):
            raise ValueError("a custom reward needs `path` (a Python file) and `function`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}")
        return self


class GRPOConfig(Section):
    """`train.grpo`: TRL's GRPOConfig fields of the same names (`objective: grpo` only).
    `per_device_train_batch_size` counts completions: rows x num_generations."""

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (a group); "
                                                      "per_device_train_batch_size x "
                                                      "gradient_accumulation_steps must be a "
                                                      "multiple of it. TRL's default: 8.")
    max_completion_length: int = Field(64, ge=1, description="Longest sampled reply, in tokens "
                                                             "(TRL's default: 512).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Min-p sampling.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty of rollouts.")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference: the base "
                                               "with the adapter disabled (no second copy). "
                                               "0 (TRL's default): no reference forward.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generated batch.")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping bound of the ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound (DAPO: "
                                                               "0.28); default: epsilon.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo",
                       "vespo"] = Field("dapo", description="TRL's GRPO loss (dapo: TRL's "
                                                            "default).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling: by the group's std, the batch's, or none "
                             "(Dr. GRPO).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Ratios per token, or per sequence (GSPO).")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="How several rewards combine (GDPO: "
                                          "normalize_then_sum).")
    mask_truncated_completions: bool = Field(False, description="Leave replies cut at "
                                                                "max_completion_length out of "
                                                                "the loss.")
    steps_per_generation: int | None = Field(None, ge=1, description="Optimizer micro-steps per "
                                                                     "generated batch; default: "
                                                                     "gradient_accumulation_steps.")
    disable_dropout: bool = Field(True, description="Dropout off in the policy (TRL's default).")
    log_completions: bool | None = Field(None, description="Log a table of sampled completions "
                                                           "with their rewards (to W&B when on, "
                                                           "and checkpoints/completions/); "
                                                           "default: on with W&B.")
    use_vllm: bool = Field(False, description="Sample rollouts with vLLM (a CUDA GPU and the vllm "
                                              "package); default: transformers' generate.")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="vLLM in the "
                                                                            "training process, "
                                                                            "or a `trl "
                                                                            "vllm-serve` server.")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate: the GPU "
                                                                            "memory vLLM takes.")


class DPOConfig(Section):
    """`train.dpo`: TRL's DPOConfig fields of the same names (`objective: dpo` only)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference "
                                               "(the base with the adapter disabled): higher "
                                               "stays closer. IPO's tau.")
    loss_type: str | list[str] = Field(
        "sigmoid", description="TRL's DPO loss(es): sigmoid (DPO), hinge, ipo, exo_pair, "
                               "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, "
                               "apo_zero, apo_down, discopop, sft, sigmoid_norm; a list combines "
                               "them with loss_weights (e.g. MPO: [sigmoid, bco_pair, sft]).")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type.")
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Robust DPO's flip "
                                                                  "probability / EXO's epsilon.")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO's weight of the reply "
                                                                 "tokens beyond the shorter reply.")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence",
                               "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO's divergence (reverse_kl: standard DPO).")
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of alpha_divergence.")
    use_weighting: bool = Field(False, description="WPO weighting of the pairs.")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP's temperature.")
    disable_dropout: bool = Field(True, description="Dropout off in the policy (TRL's default), "
                                                    "so chosen and rejected are scored alike.")

    @field_validator("loss_type")
    @classmethod
    def _known_losses(cls, v):
        names = [v] if isinstance(v, str) else v
        unknown = [n for n in names if n not in DPO_LOSSES]
        if unknown or not names:
            raise ValueError(f"unknown DPO loss {', '.join(map(repr, unknown)) or '(none)'}; "
                             f"TRL's: {', '.join(DPO_LOSSES)}")
        return v

    @model_validator(mode="after")
    def _one_weight_per_loss(self):
        names = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(f"{len(self.loss_weights)} loss_weights for {len(names)} "
                             "loss_type(s): give one weight per loss")
        return self


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "grpo"] = Field(
        "sft", description="What the generative model learns from: `sft` (imitate the replies), "
                           "`dpo` (prefer `chosen` over `rejected` replies; train.dpo) or `grpo` "
                           "(rewarded sampled replies; train.grpo). docs/objectives.md.")
    dpo: DPOConfig | None = Field(None, description="DPO settings (objective: dpo); default: "
                                                    "TRL's.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Total optimizer steps; -1 = use epochs "
                                                  "(0 is refused: it would still train a step).")
    per_device_train_batch_size: int = Field(4, ge=1, description="Batch size per device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule.")
    warmup_steps: float = Field(0, ge=0, description="Warm-up: steps, or a fraction of the "
                                                     "total steps when below 1.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="Optimizer name as in transformers "
                                                  "(adamw_torch, sgd, adamw_bnb_8bit...); the "
                                                  "same class on generative and dual encoders.")
    optim_args: str | None = Field(None, description="Optimizer arguments as transformers "
                                                     "parses them, e.g. 'momentum=0.9' for sgd.")
    max_length: int = Field(1024, ge=16, description="Longest tokenized example; longer ones are "
                                                     "dropped (see data.on_overflow).")
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints to keep.")
    eval_steps: int | None = Field(
        None, ge=1, description="Also score the `eval` metrics on the held-out data every N "
                                "steps (logged as eval/<metric>, kept in summary.json's "
                                "eval_history); default: only before and after training.")
    seed: int = Field(42, description="Seed of initialisation and data order.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; default: on where the GPU "
                                                "supports it, never on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (GPU).")
    assistant_only_loss: bool = Field(True, description="Loss only on assistant tokens.")
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")
    # Several processes and sharded training (Hugging Face TrainingArguments names;
    # docs/distributed.md).
    ddp_find_unused_parameters: bool | None = Field(
        None, description="DDP: look for parameters without gradients each step; default: "
                          "transformers' choice (on for adapters). Off is faster and safe: "
                          "text-only batches still run the vision tower.")
    fsdp: bool | str | None = Field(
        None, description="PyTorch FSDP: true, or legacy options such as 'full_shard auto_wrap'. "
                          "Or launch with `accelerate launch --config_file "
                          "recipes/accelerate/fsdp.yaml`.")
    fsdp_config: dict[str, Any] | str | None = Field(
        None, description="FSDP settings (version, reshard_after_forward, cpu_offload, "
                          "activation_checkpointing, ...): a mapping, or a JSON/YAML file relative "
                          "to the recipe.")
    deepspeed: dict[str, Any] | str | None = Field(
        None, description="DeepSpeed config: a mapping, or a JSON/YAML file relative to the "
                          "recipe (ZeRO-2/3; CUDA GPUs only).")
    # Variable-length speed-ups (data/batch/packing.py); lengths come from the cached `length`
    # column.
    group_by_length: bool | None = Field(
        None, description="Batch rows of similar token length together (less padding), keeping "
                          "some randomness (transformers' LengthGroupedSampler, seeded from "
                          "train.seed per epoch). Unset: on when the rows' cached lengths vary "
                          "(random batches would pad >= 10% of their tokens), else off; "
                          "true/false forces it.")
    packing: bool = Field(False, description="Padding-free packing: conversations are packed "
                                             "(best fit decreasing) into rows of up to "
                                             "max_length tokens, and "
                                             "per_device_train_batch_size counts packed rows; "
                                             "positions restart per conversation and attention "
                                             "cannot cross them. Families that cannot isolate "
                                             "packed conversations refuse it (`peftvlm ls "
                                             "families`).")
    # objective: grpo (docs/objectives.md)
    grpo: GRPOConfig | None = Field(None, description="GRPO settings (objective: grpo); "
                                                      "default: GRPOConfig's.")
    rewards: list[RewardSpec] | None = Field(
        None, description="GRPO's rewards, summed with their weights: [{name: exact_match}, "
                          "{name: format, weight: 0.2}] (docs/objectives.md); objective grpo "
                          "needs at least one.")
    allow_custom_rewards: bool = Field(False, description="Allow `custom` rewards: they run the "
                                                          "Python file the recipe names.")

    @field_validator("grpo", "rewards")
    @classmethod
    def _grpo_only_with_grpo(cls, v, info):
        if v is not None and info.data.get("objective") != "grpo":
            raise ValueError(f"GRPO settings need `objective: grpo` (the objective is "
                             f"{info.data.get('objective')!r}): set train.objective: grpo, or "
                             f"remove train.{info.field_name}")
        return v

    @field_validator("dpo")
    @classmethod
    def _dpo_only_with_dpo(cls, v, info):
        if v is not None and info.data.get("objective") != "dpo":
            raise ValueError(f"DPO settings need `objective: dpo` (the objective is "
                             f"{info.data.get('objective')!r}): set train.objective: dpo, or "
                             "remove train.dpo")
        return v

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, v):
        if v == 0:  # transformers reads 0 as "not set" and trains at least one step
            raise ValueError("0 steps would train nothing (transformers would still train one): "
                             "give a positive number of steps, or -1 to train num_train_epochs")
        return v


class WandbConfig(Section):
    project: str = Field("peftvlm", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user.")
    name: str | None = Field(None, description="Run name; default: the recipe name.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="Default: online with an API key, else offline with a notice.")


class TrackingConfig(Section):
    wandb: WandbConfig | None = Field(None, description="Weights & Biases tracking; off if absent.")


class EvalConfig(Section):
    """How held-out data is scored: before/after training, every `train.eval_steps`, and by
    `peftvlm eval RECIPE --run RUN` (which reproduces the summary's numbers with these settings)."""

    metrics: list[str] = Field(default_factory=lambda: ["exact_match"],
                               description="Metrics on the held-out data (`peftvlm ls metrics`).")
    max_new_tokens: int = Field(16, ge=1, description="Generation length.")
    batch_size: int = Field(16, ge=1, description="Generation batch size (prompts left-padded).")
    max_samples: int | None = Field(None, ge=1, description="Score at most this many rows (the "
                                                            "first N of the held-out data).")
    before_training: bool = Field(True, description="Also score the base model before training.")
    num_beams: int = Field(1, ge=1, description="Beam search width; 1 = greedy decoding.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding (seeded "
                                               "by train.seed, so reruns repeat).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")


class ExportConfig(Section):
    """What `peftvlm export` does by default, and what `train` does at the end of a run: with
    `merge` or `push_to_hub` set, training finishes with an export (see `peftvlm export --help`)."""

    merge: bool = Field(False, description="Merge the adapter into the (unquantized) base; "
                                           "false = export the adapter alone.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the merged weights (QLoRA bases are reloaded "
                               "unquantized in it).")
    push_to_hub: str | None = Field(None, description="Hub repo id (`user/name`) to push the "
                                                      "export to; token from HF_TOKEN or "
                                                      "`hf auth login`.")
    private: bool = Field(True, description="Create the Hub repo as private.")
    wandb_merged: bool = Field(False, description="With W&B tracking, also log the merged model "
                                                  "as an artifact (the adapter always is).")


def _method_union():
    classes = tuple(method_config_classes())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


class Recipe(Section):
    """A whole recipe: what to train, how, on what, and where to report."""

    name: str | None = Field(None, description="Run name; default: the recipe file's stem.")
    description: str | None = Field(None, description="Free text, shown in the model card.")
    model: ModelConfig
    method: _method_union()  # type: ignore[valid-type]
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    base_dir_: str | None = Field(None, alias="base_dir", description="Folder that relative "
                                  "paths resolve against; default: the recipe file's folder. "
                                  "Run folders' recipe.yaml records it, so they reload anywhere.")
    source_path: Path | None = Field(None, exclude=True, description="Where it was read from.")

    def base_dir(self) -> Path:
        """Folder that relative data paths are resolved against."""
        if self.base_dir_:
            return Path(self.base_dir_)
        return self.source_path.parent if self.source_path else Path.cwd()

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, with its base folder (secrets never live in recipes)."""
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        data["base_dir"] = str(self.base_dir().resolve())
        return yaml.safe_dump(data, sort_keys=False)
