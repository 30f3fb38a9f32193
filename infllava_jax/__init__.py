"""INF-LLaVA in JAX/Flax: dual-perspective cropping and enhancement for high-resolution MLLMs."""

__version__ = "0.1.0"
