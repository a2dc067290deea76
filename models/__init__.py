"""Model backends (embedded, OpenAI-compatible/vLLM, transformers) behind one registry."""
