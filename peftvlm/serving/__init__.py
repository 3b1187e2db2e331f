"""Using a trained run: `peftvlm predict`, the OpenAI-compatible `peftvlm serve`, `peftvlm demo`.

- `predictor.py`: open a run folder (adapter, per-part prompts, CLIP-family method) or a merged
  export folder as a `Predictor` that answers images + prompts (or ranks classes), fine-tuned or
  base, through the same loading and generation code as `peftvlm eval`.
- `predict.py`: the `predict` command: images from paths and folders, batched, JSONL out.
- `openai_api.py`: a FastAPI app speaking OpenAI's chat-completions protocol, with request
  batching (`batching.py`); `demo.py`: the Gradio app.
"""
