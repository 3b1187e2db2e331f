"""Text generators for self-instruct: a local Hugging Face model, or an OpenAI-compatible server.

Both take a batch of prompts with one seed each and return, per prompt, the generated text and
whether it was cut at `max_new_tokens` (the truncation filter reads that).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import ModelError, RecipeError
from peftvlm.models import resolve_model_path, torch_dtype


@dataclass
class Generation:
    text: str
    truncated: bool


def build_generator(config, base_dir: Path):
    """The generator a `SelfInstructConfig.generator` section describes."""
    if config.type == "local":
        return LocalGenerator(config, base_dir)
    return OpenAIGenerator(config)


class LocalGenerator:
    """transformers generation, batched with left padding; causal LMs and VLMs (text prompts)."""

    def __init__(self, config, base_dir: Path):
        self.config = config
        self.model, self.tokenizer, self.list_content = _load_local(config, base_dir)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def describe(self) -> str:
        return f"local model {self.config.path}"

    def _render(self, prompt: str) -> str:
        if not self.tokenizer.chat_template:
            return prompt
        content = [{"type": "text", "text": prompt}] if self.list_content else prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def generate(self, prompts: list[str], seeds: list[int],
                 max_new_tokens: int) -> list[Generation]:
        """One batch; seeded by its first prompt's seed, so a rerun of the batch is identical."""
        import torch

        torch.manual_seed(seeds[0])
        texts = [self._render(p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True,
                               add_special_tokens=not self.tokenizer.chat_template)
        batch = batch.to(self.model.device)
        sample = self.config.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                                      temperature=self.config.temperature if sample else None,
                                      top_p=self.config.top_p if sample else None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        return [Generation(self.tokenizer.decode(ids, skip_special_tokens=True),
                           truncated=not self.eos_ids.intersection(ids)) for ids in new]


def _load_local(config, base_dir: Path):
    """(model, tokenizer, whether the chat template wants list content) from a folder or id."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    path = config.path
    if (base_dir / path).exists():
        path = str((base_dir / path).resolve())
    path = resolve_model_path(path)
    kwargs = dict(dtype=torch_dtype(config.dtype), trust_remote_code=config.trust_remote_code)
    try:
        try:
            model, is_vlm = AutoModelForCausalLM.from_pretrained(path, **kwargs), False
        except ValueError:  # a VLM config (llava, qwen2-vl, ...) has no causal-LM mapping
            model, is_vlm = AutoModelForImageTextToText.from_pretrained(path, **kwargs), True
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"generator.path: cannot load {config.path!r}: "
                         f"{str(exc).splitlines()[0]}",
                         hint="give a folder with config.json, weights and a tokenizer, or a "
                              "Hub id (with network)") from exc
    device = config.device or ("cuda" if _cuda() else "cpu")
    return model.to(device).eval(), tokenizer, is_vlm


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIGenerator:
    """POST <url>/chat/completions, requests of a batch in parallel, retried with back-off."""

    def __init__(self, config):
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self._key = None
        if config.api_key_env:
            self._key = os.environ.get(config.api_key_env)
            if not self._key:
                raise RecipeError(f"generator.api_key_env: environment variable "
                                  f"{config.api_key_env} is not set",
                                  hint=f"export {config.api_key_env}=... before running, or "
                                       f"remove api_key_env for a server without keys")

    def describe(self) -> str:
        return f"{self.config.model} at {self.endpoint}"

    def generate(self, prompts: list[str], seeds: list[int],
                 max_new_tokens: int) -> list[Generation]:
        """One request per prompt; results come back in prompt order."""
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        workers = self.config.concurrency or len(prompts)
        with httpx.Client(headers=headers, timeout=self.config.timeout_s) as client, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda ps: self._request(client, *ps, max_new_tokens),
                                 zip(prompts, seeds)))

    def _request(self, client, prompt: str, seed: int, max_new_tokens: int) -> Generation:
        import httpx

        c = self.config
        payload = {"model": c.model, "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": max_new_tokens, "temperature": c.temperature, "top_p": c.top_p,
                   "seed": seed}
        problem = ""
        for attempt in range(c.max_retries + 1):
            if attempt:
                time.sleep(c.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = client.post(self.endpoint, json=payload)
            except httpx.HTTPError as exc:  # timeouts and connection errors
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise ModelError(self._scrub(f"generator: {self.endpoint} answered HTTP "
                                             f"{response.status_code}: {response.text[:300]}"),
                                 hint="check generator.url, generator.model and the API key")
            return self._parse(response)
        raise ModelError(self._scrub(f"generator: {self.endpoint} failed {c.max_retries + 1} "
                                     f"time(s); last: {problem}"),
                         hint="is the server running? raise generator.timeout_s or max_retries")

    def _parse(self, response) -> Generation:
        try:
            choice = response.json()["choices"][0]
            return Generation(choice["message"]["content"] or "",
                              truncated=choice.get("finish_reason") == "length")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelError(self._scrub(f"generator: {self.endpoint} sent an answer that is "
                                         f"not a chat completion: {response.text[:200]}")) from exc

    def _scrub(self, text: str) -> str:
        """Never let the key reach a message, even if a server echoes it."""
        return text.replace(self._key, "***") if self._key else text
