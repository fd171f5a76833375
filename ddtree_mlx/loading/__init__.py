"""Loading targets and drafters by name (the hub, a local folder, the embedded SmolLM2), and splitting a target
across processes."""
