"""Using a trained run: `peftvlm predict`, the OpenAI-compatible `peftvlm serve`, `peftvlm demo`.

- `predictor.py`: open a run folder (adapter, per-part prompts, CLIP-family method) or a merged
  export folder as a `Predictor` that answers images + prompts (or ranks classes), fine-tuned or
  base, through the same loading and generation code as `peftvlm eval`; `retrieval.py`: the
  predictor of a retrieval run (rank captions / images, embed texts and images).
- `predict.py`: the `predict` command: images from paths and folders, batched, JSONL out.
- `openai_api.py`: a FastAPI app speaking OpenAI's chat-completions protocol, with request
  batching (`batching.py`), `/v1/embeddings` for dual encoders (`embeddings.py`), limits checked
  cheaply first (`inputs.py`) behind the key and body guard (`guard.py`); `demo.py`: the Gradio
  app.
"""

from __future__ import annotations

import importlib

from peftvlm.errors import PeftVLMError


def require_serve_extra(command: str, *modules: str) -> None:
    """Refuse `command` with the install line when the `[serve]` extra's `modules` are missing
    (checked before any model loads; the extra is optional so that training installs less)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PeftVLMError(f"`peftvlm {command}` needs {', '.join(missing)}, which is not "
                           "installed (the optional [serve] extra)",
                           hint='pip install "peftvlm[serve]"')
