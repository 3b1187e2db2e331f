"""The self-instruct config schema and `load_config()`; paths are relative to the config file.

Unknown keys are errors; defaults are documented once, in the field descriptions. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationError, model_validator

from peftvlm._schema import Section, describe_validation_error
from peftvlm.errors import RecipeError
from peftvlm.recipe.load import apply_overrides, read_recipe_yaml

# Words a model answering about one image cannot act on. Unlike the text-only Self-Instruct
# list, image words (image, picture, photo, chart, diagram, map, draw) are allowed here.
DEFAULT_BLACKLIST = ["video", "audio", "music", "sound", "file", "files", "url", "website",
                     "go to", "write a program"]

VISUAL_TASK_TYPES = ("conversation", "detailed_description", "complex_reasoning")


class LocalGeneratorConfig(Section):
    type: Literal["local"] = Field(..., description="A local Hugging Face causal LM or VLM.")
    path: str = Field(..., description="Model folder (relative to this file) or Hub id, loaded "
                                       "with from_pretrained.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a GPU that supports it, else "
                            "float32.")
    device: str | None = Field(None, description="torch device; default cuda if available, "
                                                 "else cpu.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub repo.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")


class OpenAIGeneratorConfig(Section):
    type: Literal["openai"] = Field(..., description="An OpenAI-compatible chat/completions "
                                                     "server (vLLM, llama.cpp, Ollama, ...).")
    url: str = Field(..., description="Base URL, e.g. http://127.0.0.1:8000/v1; requests go "
                                      "to <url>/chat/completions.")
    model: str = Field(..., description="Model name the server expects.")
    api_key_env: str | None = Field(None, description="Name of the environment variable that "
                                                      "holds the API key (the key itself never "
                                                      "goes in the config, logs or report).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(3, ge=0, description="Retries on timeouts, connection errors, 429 "
                                                  "and 5xx, with exponential back-off.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First back-off; doubles per retry.")
    concurrency: int | None = Field(None, ge=1, description="Requests in flight; default: "
                                                            "batch_size.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")


GeneratorConfig = Annotated[Union[LocalGeneratorConfig, OpenAIGeneratorConfig],  # noqa: UP007
                            Field(discriminator="type")]


class FilterConfig(Section):
    drop_truncated: bool = Field(True, description="Reject the task a response was cut in "
                                                   "(generation stopped at max_new_tokens).")
    min_words: int = Field(3, ge=0, description="Shortest instruction (each question of a "
                                                "conversation), in words.")
    max_words: int = Field(150, ge=1, description="Longest instruction, in words.")
    blacklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLACKLIST),
                                 description="Words/phrases (whole words, any case) that reject "
                                             "an instruction.")
    rouge_threshold: float = Field(0.7, ge=0, le=1, description="Reject an instruction whose "
                                   "ROUGE-L F1 with any pooled instruction exceeds this.")
    near_duplicate_threshold: float = Field(0.9, ge=0, le=1, description="Reject a task whose "
                                            "whole text (instruction, input, output) has "
                                            "ROUGE-L F1 above this with a kept task.")
    use_stemmer: bool = Field(False, description="Porter-stem tokens before ROUGE-L.")

    @model_validator(mode="after")
    def _word_range(self):
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) exceeds max_words ({self.max_words})")
        return self


class SelfInstructConfig(Section):
    """`peftvlm data self-instruct CONFIG.yaml`: generate an instruction dataset."""

    mode: Literal["text", "visual"] = Field(
        "text", description="text: new tasks from seed tasks (rows without images); visual: "
                            "LLaVA-style questions and answers about annotated images.")
    seed_tasks: str = Field(..., description="Seed tasks JSONL (instruction, input, output, "
                                             "task_type, optional image context).")
    images: str | None = Field(None, description="visual mode: JSONL of images with captions "
                                                 "and normalised boxes (see the docs).")
    task_types: list[str] | None = Field(None, description="visual mode: task types to cycle "
                                         "through; default conversation, detailed_description,"
                                         " complex_reasoning.")
    output: str = Field(..., description="Output JSONL in the trainer's format; the report, "
                                         "state and pool files sit next to it.")
    num_instructions: int = Field(..., ge=1, description="Rows to produce.")
    seed_examples_per_prompt: int = Field(3, ge=0, description="k: seed tasks shown per prompt.")
    generated_examples_per_prompt: int = Field(2, ge=0, description="m: kept tasks shown per "
                                                                    "prompt.")
    tasks_per_prompt: int = Field(5, ge=1, description="New tasks (or conversation turns) "
                                                       "asked for per prompt.")
    generator: GeneratorConfig
    filters: FilterConfig = Field(default_factory=FilterConfig)
    seed: int = Field(0, description="Seed of example sampling and generation.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
    max_new_tokens: int = Field(512, ge=1, description="Generation length per prompt.")
    max_prompts: int | None = Field(None, ge=1, description="Stop after this many prompts even "
                                    "if short of num_instructions; default 20 x "
                                    "num_instructions.")

    source_path: Path | None = Field(None, exclude=True, description="Where it was read from.")

    @model_validator(mode="after")
    def _mode_inputs(self):
        if self.mode == "visual" and not self.images:
            raise ValueError("visual mode needs `images` (a JSONL of annotated images)")
        unknown = set(self.task_types or ()) - set(VISUAL_TASK_TYPES)
        if unknown:
            raise ValueError(f"unknown task type(s) {sorted(unknown)}; "
                             f"available: {', '.join(VISUAL_TASK_TYPES)}")
        return self

    def base_dir(self) -> Path:
        """Folder that relative paths are resolved against."""
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve(self, path: str) -> Path:
        """A config path made absolute (relative to the config file)."""
        return (self.base_dir() / path).resolve()

    def prompt_budget(self) -> int:
        """Most prompts to send before giving up on reaching num_instructions."""
        return self.max_prompts or 20 * self.num_instructions


def load_config(path: str | Path, overrides: list[str] | None = None) -> SelfInstructConfig:
    """Read, override and validate a config; every problem becomes one `RecipeError`."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):  # a directory, FIFO...: read_recipe_yaml says
        raise RecipeError(f"self-instruct config {path} does not exist",
                          hint="start from data_templates/self_instruct/example.yaml")
    data = apply_overrides(read_recipe_yaml(path, "self-instruct config",
                                            "data_templates/self_instruct/example.yaml"),
                           overrides or [], str(path))
    try:
        config = SelfInstructConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(describe_validation_error(exc, str(path), SelfInstructConfig)) from exc
    config.source_path = path.resolve()
    check_files(config, path)
    return config


def check_files(config: SelfInstructConfig, path: Path) -> None:
    """Input files must exist before any model loads."""
    for field in ("seed_tasks", "images"):
        value = getattr(config, field)
        if value and not config.resolve(value).is_file():
            raise RecipeError(f"{path}: {field}: file {value} does not exist (looked in "
                              f"{config.base_dir()})", hint="paths are relative to the config file")


