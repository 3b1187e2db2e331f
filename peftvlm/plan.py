"""`peftvlm plan RECIPE`: will it fit? Parameter counts and a peak-memory estimate per GPU,
without downloading weights.

The model is built on the meta device from its config (a local folder, the Hugging Face cache,
or the copies bundled for the shipped recipes in `peftvlm/families/configs/`), the recipe's
method is applied to it, and image tokens are counted by running the model's own image
processor on a blank image of the data's size. The share of positions that carry a label (what
TRL's fused LM head scores) is measured by the trainer's own collator on the first training rows
when the processor's files are at hand. `peftvlm.memory` turns that into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm import memory
from peftvlm.data.batch.collate import IGNORE_INDEX, ConversationCollator
from peftvlm.data.prepare.loading import load_rows
from peftvlm.data.read.preference import PreferenceCollator, is_preference_row
from peftvlm.data.read.images import image_size
from peftvlm.distributed import read_config_file, sharding_mode
from peftvlm.errors import ModelError, PeftVLMError
from peftvlm.families import tiny_models
from peftvlm.models import detect_family, load_processor, model_class, quantization_config
from peftvlm.recipe.schema import GRPOConfig as GRPOSettings
from peftvlm.registry import get_method

BUNDLED = Path(__file__).resolve().parent / "families" / "configs"
PLAN_IMAGE_SIDE = 4096  # larger than any shipped processor keeps: it resizes to its maximum
LABEL_SAMPLE_ROWS = 32  # training rows the labelled share is measured on (collated, images too)
# Without the data or the processor's files, every position is counted as labelled: an upper
# bound (what TRL's head scores without Triton), never an under-estimate.
DEFAULT_LABELLED_SHARE = 1.0


@dataclass
class ConfigSource:
    folder: Path
    where: str  # "local folder", "Hugging Face cache", "bundled copy", "built-in tiny model"


def find_config(model_cfg) -> ConfigSource:
    """Where the model's config.json comes from; weights are never read."""
    if model_cfg.id in tiny_models():
        from peftvlm.models import tiny_model_path

        return ConfigSource(tiny_model_path(model_cfg.id), "built-in tiny model")
    local = Path(model_cfg.id)
    if (local / "config.json").is_file():
        return ConfigSource(local, "local folder")
    cached = _hub_cache(model_cfg.id, model_cfg.revision)
    if cached is not None:
        return ConfigSource(cached, "Hugging Face cache")
    bundled = BUNDLED / model_cfg.id.replace("/", "--")
    if (bundled / "config.json").is_file():
        return ConfigSource(bundled, "bundled copy")
    raise ModelError(
        f"model.id: no config.json for {model_cfg.id!r}: not a local folder, not in the Hugging "
        "Face cache, and peftvlm bundles no copy of it",
        hint=f"fetch the two small files once: `hf download {model_cfg.id} config.json "
             "preprocessor_config.json` (no weights), or point model.id at a folder holding them")


def _hub_cache(repo_id: str, revision: str | None) -> Path | None:
    if "/" not in repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def build_on_meta(recipe, source: ConfigSource):
    """The recipe's model with its method applied, every tensor on the meta device."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.folder,
                                        trust_remote_code=recipe.model.trust_remote_code)
    family = detect_family(str(source.folder), recipe.model)
    with torch.device("meta"):
        base = model_class(family).from_config(config,
                                               trust_remote_code=recipe.model.trust_remote_code)
        base_total = sum(p.numel() for p in base.parameters())
        model = get_method(recipe.method.name).apply(base, family, recipe.method, quantized=False,
                                                     gradient_checkpointing=False)
    return model, config, family, base_total


def part_of(name: str, family) -> str:
    """vision / projector / language / other for a parameter name (peft's prefix removed);
    the projector first, as it may sit inside the vision module (Qwen's merger)."""
    name = name.removeprefix("base_model.model.")
    for part in ("projector", "vision", "language"):
        prefix = family.module_prefix(part)
        if prefix and name.startswith(prefix + "."):
            return part
    return "other"


def quantized_weights(model, recipe, family) -> set[str]:
    """Names of the weights bitsandbytes would quantize: linear layers outside the skip list."""
    from torch import nn

    quant = quantization_config(recipe.model, family, recipe.method.name)
    if quant is None:
        return set()
    skip = quant.llm_int8_skip_modules or []
    names = set()
    for name, module in model.named_modules():
        plain = name.removeprefix("base_model.model.")
        if type(module) is nn.Linear and not any(plain.startswith(s) for s in skip) \
                and ".lora_" not in name and "modules_to_save" not in name:
            names.add(f"{name}.weight")
    return names


def adapter_values_per_layer(model, layers: int, dropout: float) -> int:
    """Per-token values LoRA layers save beyond the base layer: the rank-r intermediate and,
    with dropout, a dropped copy of the layer input (averaged per decoder layer)."""
    total = 0
    for module in model.modules():
        ranks = getattr(module, "r", None)
        if isinstance(ranks, dict) and ranks and hasattr(module, "in_features"):
            total += sum(ranks.values()) + (module.in_features if dropout > 0 else 0)
    return total // max(layers, 1)


def text_dims(config) -> dict:
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return dict(layers=text.num_hidden_layers, hidden=text.hidden_size,
                intermediate=text.intermediate_size, q_dim=heads * head_dim,
                kv_dim=kv * head_dim, vocab=text.vocab_size)


def vision_dims(config) -> dict:
    v = getattr(config, "vision_config", None)
    if v is None:
        return {}
    hidden = getattr(v, "embed_dim", None) or v.hidden_size
    layers = getattr(v, "num_hidden_layers", None) or getattr(v, "depth", 0)
    inter = getattr(v, "intermediate_size", None) or int(hidden * getattr(v, "mlp_ratio", 4))
    return dict(vision_layers=layers, vision_hidden=hidden, vision_intermediate=inter)


def largest_layer(model) -> int:
    """Parameters of the largest repeated block (what FSDP gathers at a time)."""
    from torch import nn

    best = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                best = max(best, sum(p.numel() for p in block.parameters()))
    return best


def model_shape(recipe, model, config, family) -> tuple[memory.Shape, dict]:
    """Parameter counts by storage and by part, and the layer sizes activations depend on."""
    quantized = quantized_weights(model, recipe, family)
    bits = (recipe.model.quantization.bits if recipe.model.quantization else 4)
    counts = {"trainable": 0, "full": 0, "quant": 0}
    parts: dict[str, int] = {}
    vision_trainable = False
    for name, p in model.named_parameters():
        n = p.numel()
        part = part_of(name, family)
        parts[part] = parts.get(part, 0) + n
        if p.requires_grad:
            counts["trainable"] += n
            vision_trainable |= part == "vision"
        else:
            counts["quant" if name in quantized else "full"] += n
    dims = text_dims(config)
    dropout = getattr(recipe.method, "lora_dropout", 0.0) or 0.0
    shape = memory.Shape(
        total_params=sum(parts.values()), trainable_params=counts["trainable"],
        frozen_params_full=counts["full"],
        frozen_params_4bit=counts["quant"] if bits == 4 else 0,
        frozen_params_8bit=counts["quant"] if bits == 8 else 0,
        double_quant=recipe.model.quantization.double_quant if recipe.model.quantization else True,
        dtype="bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype,  # on a GPU
        adapter_inputs_per_layer=adapter_values_per_layer(model, dims["layers"], dropout),
        vision_trainable=vision_trainable, largest_layer_params=largest_layer(model),
        unfused_lm_head=bool(family.unfused_lm_head),
        **dims, **vision_dims(config))
    return shape, parts


def image_tokens(source: ConfigSource, config, family, size: tuple[int, int]) -> dict | None:
    """Tokens and vision patches of one image of `size` (width, height), as the model's own
    image processor resizes and tiles it. None when the family cannot say."""
    if family.image_tokens is None:
        return None
    from PIL import Image
    from transformers import AutoImageProcessor

    try:  # preprocessor_config.json, or the image processor inside processor_config.json
        processor = AutoImageProcessor.from_pretrained(source.folder)
    except (OSError, ValueError):
        return None
    inputs = processor(images=[Image.new("RGB", size)], return_tensors="np")
    tokens, patches = family.image_tokens(dict(inputs), config)
    return {"size": list(size), "tokens": tokens, "patches": patches,
            "processed": list(inputs["pixel_values"].shape)}


def local_rows(recipe, family, limit: int = 256) -> list[dict] | None:
    """The first `limit` training rows when the recipe's data is local (files or a synthetic
    task); None for Hub datasets (planning downloads nothing)."""
    if any(src.dataset for src in recipe.data.train or []):
        return None
    return list(load_rows(recipe, family.box_format).train[:limit])


def data_images(rows: list[dict] | None) -> tuple[tuple[int, int], int] | None:
    """The largest image (by area) and the most images a row holds over `rows` (`local_rows`);
    None without rows or images."""
    if not rows:
        return None
    sizes = [image_size(image) for row in rows for image in row["images"]]
    if not sizes:
        return None
    return max(sizes, key=lambda wh: wh[0] * wh[1]), max(len(r["images"]) for r in rows)


def labelled_share(recipe, source: ConfigSource, family, rows: list[dict] | None = None) -> dict:
    """The share of a row's positions that carry a label, as the trainer's collator labels the
    first `LABEL_SAMPLE_ROWS` training rows (of `rows` when given: `local_rows`; image tokens
    included): SFT's assistant tokens (all of them
    with `train.assistant_only_loss: false`), DPO's final replies (`completion_mask`) over
    chosen and rejected. {"share", "from"}; `DEFAULT_LABELLED_SHARE` when the data is on the
    Hub or no processor (tokenizer) sits beside the config (a bundled copy)."""
    if not family.is_generative or recipe.train.objective == "grpo":
        return {"share": DEFAULT_LABELLED_SHARE, "from": "not used"}  # GRPO: from the lengths
    rows = local_rows(recipe, family, LABEL_SAMPLE_ROWS) if rows is None \
        else rows[:LABEL_SAMPLE_ROWS]
    processor = local_processor(recipe, source, family) if rows else None
    if processor is None:
        why = "no tokenizer beside the config" if rows else "the training data is not local"
        return {"share": DEFAULT_LABELLED_SHARE, "from": f"default: every position, as {why}; "
                "--labelled-share sets it"}
    collator = ConversationCollator(processor, family, recipe.train.assistant_only_loss)
    if recipe.train.objective == "dpo" and is_preference_row(rows[0]):
        collator = PreferenceCollator(collator)
    labelled = positions = 0
    for start in range(0, len(rows), 8):
        batch = collator(rows[start:start + 8])
        marks = batch.get("completion_mask")  # DPO's replies; SFT: the labels
        marks = batch["labels"] != IGNORE_INDEX if marks is None else marks.bool()
        labelled += int(marks[:, 1:].sum())  # the head scores each position's next token
        positions += int(batch["attention_mask"].sum())
    return {"share": labelled / max(positions, 1),
            "from": f"labelled by the collator on the first {len(rows)} training rows"}


def local_processor(recipe, source: ConfigSource, family):
    """The model's processor from the config's folder (nothing downloaded), or None when the
    folder holds no usable tokenizer (bundled copies keep only the config files)."""
    try:
        processor = load_processor(str(source.folder), recipe.model, family)
    except (OSError, ValueError, AttributeError, PeftVLMError):  # an image processor alone
        return None
    return processor if getattr(processor, "tokenizer", None) is not None else None


def recipe_sharding(recipe) -> str:
    """none / fsdp / zero2 / zero3 from the recipe's train section (what plan assumes)."""
    mode = sharding_mode(recipe.train)
    if mode == "deepspeed":
        ds = recipe.train.deepspeed
        config = read_config_file(ds, recipe.base_dir(), "deepspeed", str(recipe.source_path)) \
            if ds is not None else {}
        stage = (config.get("zero_optimization") or {}).get("stage", 3 if ds is None else 0)
        return "zero3" if stage == 3 else "zero2" if stage in (1, 2) else "ddp"
    return mode or "none"


def plan(recipe, *, gpu: str | None = None, gpus: int | None = None, sharding: str | None = None,
         image_size: tuple[int, int] | None = None, images_per_row: int | None = None,
         text_tokens: int | None = None, labelled: float | None = None) -> dict:
    """Counts, token budget, memory estimate, GPU fits and suggestions for a recipe
    (`labelled`: the share of positions with a label; by default measured on the data)."""
    target = pick_gpu(gpu)  # a GPU plan does not know is refused before any work
    source = find_config(recipe.model)
    model, config, family, base_total = build_on_meta(recipe, source)
    shape, parts = model_shape(recipe, model, config, family)
    # the data's first rows, read once for its image sizes and its labelled share
    rows = local_rows(recipe, family) if image_size is None or labelled is None else None
    images = image_budget(source, config, family, image_size, images_per_row, rows)
    labels = {"share": labelled, "from": "given"} if labelled is not None \
        else labelled_share(recipe, source, family, rows)
    seq = recipe.train.max_length
    if text_tokens is not None and images:
        seq = min(seq, text_tokens + images["per_row"] * images["tokens"])
    elif text_tokens is not None:
        seq = min(seq, text_tokens)
    mode = sharding or recipe_sharding(recipe)
    work = memory.Workload(**{
        "batch_size": recipe.train.per_device_train_batch_size, "seq_len": seq,
        "vision_patches": (images["patches"] * images["per_row"]) if images else 0,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "optim": recipe.train.optim, "sharding": mode,
        "gpus": gpus or (2 if mode in ("fsdp", "zero2", "zero3") else 1),
        "labelled_share": labels["share"], **objective_workload(recipe.train, seq)})
    result = memory.estimate(shape, work)
    return {
        "recipe": str(recipe.source_path), "model": recipe.model.id, "family": family.name,
        "method": recipe.method.name, "config": {"folder": str(source.folder),
                                                  "from": source.where},
        "base_params": base_total, "total_params": shape.total_params,
        "trainable_params": shape.trainable_params, "params_by_part": parts,
        "quantized_params": shape.frozen_params_4bit + shape.frozen_params_8bit,
        "images": images, "labels": labels, "seq_len": seq,
        "max_length": recipe.train.max_length,
        "estimate": result, "fits": memory.fits(result["with_overhead"]),
        "gpu": target, "suggestions": suggestions(recipe, shape, work, result, target, images),
        "assumptions": memory.ASSUMPTIONS, **memory.as_dict(shape, work),
    }


def objective_workload(train, seq: int) -> dict:
    """What the recipe's objective adds to a step, as TRL 1.16 runs it: DPO's chosen + rejected
    batch and reference forward; GRPO's rollouts (`seq` prompt tokens + max_completion_length,
    per_device_train_batch_size x steps_per_generation sampled at once) and, with beta > 0,
    its reference forward."""
    if train.objective == "dpo":
        return {"objective": "dpo", "reference": True}
    if train.objective == "grpo":
        grpo = train.grpo or GRPOSettings()
        per_generation = grpo.steps_per_generation or train.gradient_accumulation_steps
        return {"objective": "grpo", "reference": grpo.beta > 0, "prompt_len": seq,
                "seq_len": seq + grpo.max_completion_length,
                "generated": train.per_device_train_batch_size * per_generation}
    return {"objective": train.objective}


def image_budget(source, config, family, size, per_row, rows) -> dict | None:
    """Image tokens per image from the largest image of `rows` (or `size`, or the processor's
    largest), and how many images a row holds."""
    found = None if size else data_images(rows)
    origin = "given" if size else "largest in the data" if found else "processor maximum"
    size = size or (found[0] if found else (PLAN_IMAGE_SIDE, PLAN_IMAGE_SIDE))
    counted = image_tokens(source, config, family, size)
    if counted is None:
        return None
    counted["per_row"] = per_row if per_row is not None else (found[1] if found else 1)
    counted["size_from"] = origin
    return counted


def pick_gpu(name: str | None) -> dict:
    """A GPU by memory size (`24`, `80GB`) or card name (`4090`, `a100-40gb`, `h100`)."""
    if name is None:
        return {"gib": memory.GPUS[0][0], "cards": memory.GPUS[0][1], "asked": None}
    key = name.lower().replace("gib", "").replace("gb", "").replace("-", " ").strip()
    for gib, cards in memory.GPUS:
        if key == str(gib):
            return {"gib": gib, "cards": cards, "asked": name}
    words = key.split()
    for gib, cards in memory.GPUS:
        lowered = cards.lower()
        if all(w in lowered or w == str(gib) for w in words):
            return {"gib": gib, "cards": cards, "asked": name}

    raise PeftVLMError(f"--gpu {name}: not a GPU plan knows",
                       hint="give its memory in GiB (24, 40, 48, 80, 141) or one of: "
                            + "; ".join(c for _, c in memory.GPUS))


def suggestions(recipe, shape, work, result, target, images) -> list[dict]:
    """Changes that bring the step under `target`'s memory, applied one after another (each
    line's estimate includes the changes above it), stopping at the first that fits."""
    from dataclasses import replace

    limit = target["gib"] * memory.GIB
    if result["with_overhead"] <= limit:
        return []
    out = []

    def step(what: str, change: str, shape_changes=None, work_changes=None) -> bool:
        nonlocal shape, work
        shape, work = replace(shape, **(shape_changes or {})), replace(work, **(work_changes or {}))
        est = memory.estimate(shape, work)["with_overhead"]
        out.append({"what": what, "change": change, "gib": est / memory.GIB,
                    "fits": est <= limit})
        return est <= limit

    if not work.gradient_checkpointing and step(
            "gradient checkpointing", "train.gradient_checkpointing=true",
            work_changes={"gradient_checkpointing": True}):
        return out
    accumulation = recipe.train.gradient_accumulation_steps
    while work.batch_size > 1:
        half, accumulation = work.batch_size // 2, accumulation * 2
        if step("half the batch, same global batch",
                f"train.per_device_train_batch_size={half} "
                f"train.gradient_accumulation_steps={accumulation}",
                work_changes={"batch_size": half}):
            return out
    if shape.frozen_params_4bit == 0 and recipe.method.name in ("lora", "dora"):
        quantizable = min(_quantizable(shape), shape.frozen_params_full)
        if step("QLoRA: the language model's linear layers in 4-bit", "method.name=qlora",
                {"frozen_params_full": shape.frozen_params_full - quantizable,
                 "frozen_params_4bit": quantizable}):
            return out
    if images and images["tokens"] * images["per_row"] > work.seq_len // 4:
        reply = work.seq_len - work.prompt_len if work.prompt_len else 0  # GRPO's completions
        shorter = max(256, (work.seq_len - reply) // 2)
        prompt = {"prompt_len": shorter} if reply else {}
        if step("fewer image tokens: smaller images (the image processor's max_pixels / "
                "size) and shorter rows", f"train.max_length={shorter}",
                work_changes={"seq_len": shorter + reply, **prompt,
                              "vision_patches": work.vision_patches // 4}):
            return out
    for n in (2, 4, 8):
        if work.gpus < n:
            config = "fsdp-qlora" if shape.frozen_params_4bit else "fsdp"
            if step(f"FSDP over {n} GPUs", f"accelerate launch --config_file "
                    f"recipes/accelerate/{config}.yaml --num_processes {n} -m peftvlm train "
                    "RECIPE", work_changes={"gpus": n, "sharding": "fsdp"}):
                return out
    return out


def _quantizable(shape) -> int:
    """Frozen language-model parameters QLoRA would store in 4 bits (linear weights): all
    frozen ones but the embeddings, norms and the parts QLoRA leaves in full precision."""
    return max(0, shape.layers * (2 * shape.hidden * shape.q_dim + 2 * shape.hidden * shape.kv_dim
                                  + 3 * shape.hidden * shape.intermediate))


def _gib(value: float) -> str:
    return f"{value / memory.GIB:.1f}"


def _b(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def objective_lines(w: dict, est: dict) -> list[str]:
    """Table rows for what DPO / GRPO add beside the training step (phases that do not overlap
    it count towards the peak only when larger)."""
    phases, lines = est["phases"], []
    if w["objective"] == "dpo":
        lines.append("| (chosen + rejected) | | DPO: 2 x "
                     f"{w['batch_size']} rows of {w['seq_len']:,} tokens through the policy |")
    if "reference" in phases:
        when = ("after the policy's forward, its activations held" if w["objective"] == "dpo"
                else "after the rollouts, before the step, nothing of it held")
        lines.append(f"| reference phase | {_gib(phases['reference'])} | the base (adapter "
                     f"disabled), no grad, {when} |")
    if est.get("rollout"):
        r = est["rollout"]
        lines.append(f"| rollout phase | {_gib(phases['rollout'])} | {w['generated']} "
                     f"completions of {w['prompt_len']:,} + "
                     f"{w['seq_len'] - w['prompt_len']:,} tokens: KV cache {_gib(r['kv_cache'])}, "
                     f"prefill {_gib(r['prefill'])}, last-token logits {_gib(r['logits'])} |")
    if len(phases) > 1:
        lines.append(f"| (peak phase) | | {est['peak_phase']}: the phases run one after "
                     "another, so the peak adds only the largest to the weights, adapter, "
                     "gradients and optimizer |")
    return lines


def head_positions(result: dict) -> str:
    """What the loss head row counts: which head, and over which positions."""
    s, w = result["shape"], result["workload"]
    if s["unfused_lm_head"]:
        return "logits + fp32 log-softmax + gradient, every position"
    head = "TRL's fused head, tiles of 4,096 tokens x 32,768 entries"
    work = memory.Workload(**w)
    if w["objective"] == "grpo":
        return f"{head}, over the {memory.scored_tokens(work, 0):,} completion tokens"
    tokens = memory.step_rows(work) * w["seq_len"]
    return (f"{head}, over the {memory.scored_tokens(work, tokens):,} labelled positions "
            f"({100 * w['labelled_share']:.0f}% of {tokens:,})")


def render(result: dict) -> str:
    """The plan as text: counts, tokens, the memory table, fits, changes and assumptions."""
    s, w, est = result["shape"], result["workload"], result["estimate"]
    parts = est["parts"]
    lines = [f"model: {result['model']} ({result['family']}); config: {result['config']['from']} "
             f"{result['config']['folder']} (no weights read)",
             f"parameters: {result['base_params']:,} ({_b(result['base_params'])}) in the base; "
             f"{result['method']} trains {result['trainable_params']:,} "
             f"({100 * result['trainable_params'] / result['total_params']:.2f}% of "
             f"{result['total_params']:,} with the adapter)",
             "  by part: " + ", ".join(f"{k} {_b(v)}" for k, v in
                                       result["params_by_part"].items())]
    images = result["images"]
    if images:
        lines.append(f"image tokens: {images['tokens']} per image ({images['patches']} vision "
                     f"patches) for a {images['size'][0]}x{images['size'][1]} image "
                     f"({images['size_from']}; processed as {images['processed']}), "
                     f"{images['per_row']} per row")
        if images["tokens"] * images["per_row"] >= result["max_length"]:
            lines.append(f"  warning: that is more than train.max_length {result['max_length']}:"
                         " such rows are dropped; raise max_length or use smaller images")
    else:
        lines.append("image tokens: not counted (no image processor settings for this model)")
    lines.append(f"objective: {w['objective']}")
    labels = result["labels"]
    if w["objective"] != "grpo" and not s["unfused_lm_head"]:
        lines.append(f"labelled positions: {100 * labels['share']:.1f}% of each row "
                     f"({labels['from']}); TRL's fused head scores only these")
    lines.append(f"sequence: {result['seq_len']} tokens per row (train.max_length "
                 f"{result['max_length']}), batch {w['batch_size']} per GPU, gradient "
                 f"checkpointing {'on' if w['gradient_checkpointing'] else 'off'}, "
                 f"{w['gpus']} GPU(s), sharding {w['sharding']}")
    quant = s["frozen_params_4bit"] + s["frozen_params_8bit"]
    how = {
        "weights": f"{_b(quant)} quantized, {_b(s['frozen_params_full'])} at {s['dtype']}"
        if quant else f"{_b(s['frozen_params_full'])} frozen at {s['dtype']}",
        "adapter": f"{_b(s['trainable_params'])} trainable in fp32",
        "gradients": "fp32, trainable parameters only",
        "optimizer": f"{w['optim']}: {memory.optimizer_bytes_per_param(w['optim']):g} B per "
                     "trainable parameter",
        "activations": f"{memory.step_rows(memory.Workload(**w)) * w['seq_len']:,} tokens x "
                       f"{s['layers']} layers",
        "logits": f"vocabulary {s['vocab']:,}: " + head_positions(result),
        "vision": "trainable: kept for backward" if s["vision_trainable"]
        else "frozen: one layer live at a time",
    }
    lines += ["", "| memory per GPU | GiB | how |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {_gib(v)} | {how[k]} |" for k, v in parts.items()]
    lines += objective_lines(w, est)
    lines += [f"| **peak allocated** | **{_gib(est['peak_allocated'])}** | PyTorch's peak |",
              f"| **with CUDA context** | **{_gib(est['with_overhead'])}** | as nvidia-smi "
              "shows it |", ""]
    lines.append("fits: " + "; ".join(f"{g['gib']} GiB ({g['cards']}) "
                                      f"{'yes' if g['fits'] else 'no'}" for g in result["fits"]))
    target = result["gpu"]
    if result["suggestions"]:
        lines.append(f"does not fit {target['gib']} GiB ({target['cards']}); changes, applied "
                     "in turn (each estimate includes those above it):")
        lines += [f"  - {o['what']}: {o['change']} -> {o['gib']:.1f} GiB"
                  f"{' (fits)' if o['fits'] else ''}" for o in result["suggestions"]]
    elif target["asked"]:
        lines.append(f"fits {target['gib']} GiB ({target['cards']})")
    lines += ["", "assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)
