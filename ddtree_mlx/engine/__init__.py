"""The generation loop (draft -> build -> verify -> walk -> commit), sampling, automatic tree sizing and its
calibration, the prompt cache, and what sharded ranks must agree on."""
