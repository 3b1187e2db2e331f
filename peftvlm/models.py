"""Load a base model and its processor: Hub id, local folder, or a built-in tiny model.

Built-in tiny models are built once from config (random weights, local tokenizer and processor)
into a cache folder, then loaded through the very same `from_pretrained` path as a real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import ModelError
from peftvlm.families import family_for_model_type, get_family, tiny_models
from peftvlm.families.base import FamilySpec

TINY_VERSION = "v5"  # bump when a tiny builder changes, so stale caches are rebuilt (v5: video)


@dataclass
class LoadedModel:
    model: object
    processor: object
    family: FamilySpec
    path: str
    quantized: bool


def cache_dir() -> Path:
    """Where built-in tiny models and synthetic data live (`PEFTVLM_CACHE`, else ~/.cache)."""
    return Path(os.environ.get("PEFTVLM_CACHE", Path.home() / ".cache" / "peftvlm"))


def tiny_model_path(name: str) -> Path:
    """Build the tiny model `name` into the cache once (atomically) and return its folder."""
    spec = tiny_models()[name]
    target = cache_dir() / "models" / f"{name}-{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        import torch

        # Same weights on every machine, and the caller's RNG (adapter init, data order) is
        # left exactly as if the model had been cached already.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            spec.build_tiny(tmp)
        os.replace(tmp, target)  # another process may have won the race: that is fine
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_id: str) -> str:
    """A tiny name becomes its cache folder; folders and Hub ids pass through unchanged."""
    if model_id in tiny_models():
        return str(tiny_model_path(model_id))
    return model_id


def detect_family(path: str, cfg) -> FamilySpec:
    """The recipe's family, or the one whose spec lists the config's `model_type`."""
    if cfg.family:
        return get_family(cfg.family)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.id: cannot load a config from {cfg.id!r}: "
                         f"{str(exc).splitlines()[0]}",
                         hint="give a local folder with config.json, a Hub id (with network), or "
                              "a built-in tiny model (`peftvlm ls models`)") from exc
    return family_for_model_type(config.model_type)


def torch_dtype(name: str):
    """`auto` is bf16 on a GPU that supports it, else fp32 (CPU training in fp32)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def quantization_config(model_cfg, family: FamilySpec, method_name: str, sharded: bool = False):
    """bitsandbytes config: the recipe's, or QLoRA's 4-bit nf4 default; None for no quantization.

    `sharded` (FSDP / DeepSpeed ZeRO-3): 4-bit weights are stored in the compute dtype
    (`bnb_4bit_quant_storage`), so FSDP can flatten and shard them with the bf16 parameters."""
    q = model_cfg.quantization
    if q is None and method_name == "qlora":
        from peftvlm.recipe.schema import QuantizationConfig

        q = QuantizationConfig()
    if q is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = q.skip_modules if q.skip_modules is not None else family.quantization_skip_modules()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = torch_dtype(q.compute_dtype)
    storage = {"bnb_4bit_quant_storage": compute} if sharded else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip,
                              **storage)


def disable_cpu_inference_repacking(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU bf16 inference kernel.

    On CPUs with AVX512-BF16, the first no-grad eval forward repacks each weight; afterwards
    layers without bias get silently wrong gradients and layers with bias crash. Returns the
    number of modules switched off.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def model_class(family: FamilySpec):
    from transformers import AutoModel, AutoModelForImageTextToText

    if family.model_class is not None:
        return family.model_class()
    return AutoModelForImageTextToText if family.is_generative else AutoModel


def load_processor(path: str, cfg, family: FamilySpec):
    """The checkpoint's processor; a family that must deviate from the checkpoint's chat template
    sets its own here, once, so training, eval, preview and the saved processor all agree."""
    from transformers import AutoProcessor

    loader = family.processor_class() if getattr(family, "processor_class", None) else AutoProcessor
    processor = loader.from_pretrained(path, revision=cfg.revision,
                                       trust_remote_code=cfg.trust_remote_code)
    if not family.is_generative:
        return processor
    override = family.chat_template_override()
    if override is not None:
        processor.chat_template = override
        if getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.chat_template = override
    if family.encode is None and not (getattr(processor, "chat_template", None)
                                      or getattr(processor.tokenizer, "chat_template", None)):
        raise ModelError(f"model.id: {cfg.id!r} ships no chat template, and the {family.name} "
                         "family renders conversations with the checkpoint's own template",
                         hint="use the checkpoint's -Instruct/chat variant, which ships "
                              "chat_template.jinja, or add a template to its folder")
    return processor


def load_processor_only(cfg) -> tuple[object, FamilySpec]:
    """The processor and family of a recipe's model without loading its weights (data preview
    and stats); a built-in tiny model is still built into the cache once if missing."""
    path = resolve_model_path(cfg.id)
    family = detect_family(path, cfg)
    try:
        return load_processor(path, cfg, family), family
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.id: cannot load a processor from {cfg.id!r}: "
                         f"{str(exc).splitlines()[0]}",
                         hint="the folder needs the processor/tokenizer files") from exc


def load_base(cfg, method_name: str = "lora", sharded: bool = False) -> LoadedModel:
    """Load the recipe's base model (safetensors only) and processor, quantized if asked
    (`sharded`: stored so that FSDP / ZeRO-3 can shard the 4-bit weights)."""
    path = resolve_model_path(cfg.id)
    family = detect_family(path, cfg)
    quant = quantization_config(cfg, family, method_name, sharded)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                  use_safetensors=True, dtype=torch_dtype(cfg.dtype))
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = model_class(family).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.id: cannot load {cfg.id!r}: {str(exc).splitlines()[0]}",
                         hint="the folder needs config.json and *.safetensors weights") from exc
    if quant is not None:
        disable_cpu_inference_repacking(model)
    processor = load_processor(path, cfg, family)
    return LoadedModel(model, processor, family, path, quant is not None)
