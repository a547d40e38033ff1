"""Adapters that plug moeblaze into other training stacks. Each is imported explicitly:

- `moeblaze.integrations.huggingface`: registers "moeblaze" experts implementations with
  Hugging Face `transformers` (v5).
- `moeblaze.integrations.megatron`: `MoELayer(config)` for Megatron-style models, and loading of
  Megatron expert weights.

This package imports neither `transformers` nor `megatron`: `import moeblaze` never pulls them in.
"""
