"""Pytest plugin: a real OpenAI-compatible server (llama_cpp.server serving SmolLM2) on
127.0.0.1. Filled in by the OpenAI backend tests' author; kept importable meanwhile."""
