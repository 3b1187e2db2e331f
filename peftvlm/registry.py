"""The METHODS registry: method name -> config class, apply function, and the models it fits.

peft's own registry is closed to outside packages, so CoOp/VPT/CLIP-Adapter register here
next to the peft-backed methods. A method module registers itself with one `register(...)` call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

from peftvlm.errors import RecipeError

Kind = Literal["generative", "dual_encoder"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type
    apply_path: str  # "module:function", imported only when the method is applied
    kinds: tuple[Kind, ...]
    summary: str

    @property
    def trains_generative(self) -> bool:
        """The method adapts generative VLMs (LoRA and the other peft methods)."""
        return "generative" in self.kinds

    @property
    def trains_dual_encoders(self) -> bool:
        """The method adapts dual encoders (CLIP-family methods; lora/dora/vera for retrieval)."""
        return "dual_encoder" in self.kinds

    @property
    def apply(self) -> Callable:
        module, _, func = self.apply_path.partition(":")
        return getattr(importlib.import_module(module), func)

    def hook(self, name: str) -> Callable | None:
        """An optional function of the method's module: `load_trained(base, adapter_dir)` to
        reload a run's adapter (default: peft's), `export_adapter(...)` to export it."""
        module = importlib.import_module(self.apply_path.partition(":")[0])
        return getattr(module, name, None)


METHODS: dict[str, MethodInfo] = {}
_BUILTIN_MODULES = ("peftvlm.methods.lora", "peftvlm.methods.coop", "peftvlm.methods.vpt",
                    "peftvlm.methods.clip_adapter", "peftvlm.methods.per_part")


def register(name: str, config_cls: type, apply_path: str, kinds: tuple[Kind, ...],
             summary: str) -> None:
    """Add a method; its config class must have `name: Literal[name]`."""
    METHODS[name] = MethodInfo(name, config_cls, apply_path, kinds, summary)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def method_config_classes() -> list[type]:
    _load_builtins()
    return [m.config_cls for m in METHODS.values()]


def get_method(name: str) -> MethodInfo:
    _load_builtins()
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
