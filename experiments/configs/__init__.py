"""ml_collections config files: each defines `get_config(variant)` over `fmjax.configs.base_config`."""
