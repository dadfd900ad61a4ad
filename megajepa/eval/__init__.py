"""Held-out evaluation (`megajepa eval`).

    data          held-out view pairs from MDS shards or chat JSONL
    generation    greedy decoding of view B from the prompt
    regex_check   the embedded regex task's checker (same whole-line matches)
    latent        teacher-forced CE and JEPA metrics in the packed single pass
    run           loading a model, data-parallel evaluation, the table and JSON
"""
