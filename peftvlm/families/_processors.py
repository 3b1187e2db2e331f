"""Processor subclasses for checkpoints whose stock processor does not fit as it is.

transformers builds video processors on torchvision; without it the stock `InternVLProcessor`
and `LlavaOnevisionProcessor` cannot even be constructed. `image_only(cls, init)` is a subclass
whose sub-processors are just the image processor and tokenizer, so it builds, saves and loads
without torchvision (`init` may attach a NumPy video processor, as LLaVA-OneVision's does).
`with_init(cls, init)` is the same mechanism for other `__init__` fixes (BLIP-2's processor
drops its chat template).
"""

from __future__ import annotations


def image_only(processor_cls: type, init, mixins: tuple[type, ...] = ()) -> type:
    """A subclass of `processor_cls` whose `__init__` is `init`, which must not take a
    `video_processor` and must call `processor_cls.__init__(self, ..., None, ...)` itself.

    `ProcessorMixin` reads sub-processors from the `__init__` signature and the settings it saves
    and reloads from its code object's argument names, so `init` spells out the parent's
    parameters (less `video_processor`) as real arguments; ProcessorMixin pairs positional
    sub-processors with the signature's names and drops the extra `None`.
    """
    return with_init(processor_cls, init, "ImageOnly", mixins)


def with_init(processor_cls: type, init, prefix: str = "PeftVLM",
              mixins: tuple[type, ...] = ()) -> type:
    """A subclass of `processor_cls` (after `mixins`) with `init` as its `__init__` (see
    `image_only`)."""
    cls = type(processor_cls.__name__, (*mixins, processor_cls), {"__init__": init})
    # Saved folders name the stock class (`processor_class`), as Hub checkpoints do.
    cls.__qualname__ = prefix + processor_cls.__name__
    cls.__module__ = init.__module__
    return cls
