"""Recipes: the typed schema (`schema`), YAML loading with overrides (`load`) and the
cross-field checks run before anything loads (`checks`).

The public API is `from peftvlm.recipe import Recipe, load_recipe`; code inside peftvlm imports
each name from the submodule that defines it.
"""

from peftvlm.recipe.load import (apply_overrides, load_recipe, read_recipe_yaml,
                                 validate_recipe_dict)
from peftvlm.recipe.schema import (DataConfig, EvalConfig, ExportConfig, ModelConfig, Recipe,
                                   SourceConfig, TrainConfig)

__all__ = ["DataConfig", "EvalConfig", "ExportConfig", "ModelConfig", "Recipe", "SourceConfig",
           "TrainConfig", "apply_overrides", "load_recipe", "read_recipe_yaml",
           "validate_recipe_dict"]
