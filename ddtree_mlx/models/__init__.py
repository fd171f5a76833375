"""Target adapters, one file per model family (llama, qwen3, qwen3_5), over what they share: the adapter (forward,
prefill, verify, step), tree attention, the verify's tables and captures, sharding, and the KV cache's quantization.
`registry.adapter_for` picks the adapter for an mlx-lm model."""
