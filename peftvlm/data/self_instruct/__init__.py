"""Self-instruct: generate an instruction dataset with a local model or an OpenAI-compatible server.

    peftvlm data self-instruct data_templates/self_instruct/example.yaml

Text mode grows new tasks from seed tasks (Self-Instruct / Alpaca); visual mode writes LLaVA-style
conversations, detailed descriptions and reasoning questions about annotated images. Kept rows
are in the trainer's `{"messages", "images"}` format; a report counts what each filter rejected.
Modules: config (schema), seeds (seed tasks, image annotations), prompts (prompting and
parsing), generators (local / HTTP), filters, pipeline (the resumable loop).
"""

from peftvlm.data.self_instruct.config import SelfInstructConfig, load_config
from peftvlm.data.self_instruct.pipeline import run_self_instruct

__all__ = ["SelfInstructConfig", "load_config", "run_self_instruct"]
