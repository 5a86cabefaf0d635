"""One module per checkpoint family, each a declaration: a `FAMILY = Family(...)` naming its model_types, its
config.json -> ModelConfig mapping and its tensor key map. `converters.registry` finds them by themselves, so
adding a family is adding a file here (plus, for a genuinely new mechanism, a ModelConfig feature)."""
