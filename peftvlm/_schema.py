"""The base class of every recipe section (shared by the recipe and method configs)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
