"""The package's configs, loaded by name: `infllava train --config synthetic[:arg]`.

Each module has a `get_config(arg)` returning a ConfigDict (`infllava_jax.config.load_config`
calls it); the checkout's `configs/*.py` return the same configs.
"""
