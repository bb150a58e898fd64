"""Model card templates, installed as the package data of `hf_otfusion.model_cards` (see pyproject.toml)."""
