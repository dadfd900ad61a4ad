"""Held-out evaluation (`megajepa eval`).

    data          held-out view pairs from MDS shards or chat JSONL
    generation    greedy decoding of view B from the prompt
    checkers      the task checkers (exact, regex, nlrx, gsm8k, nq_open) and which one the data gets
    regex_check   the Python-regex checker (the embedded data: same whole-line matches)
    regex_sampler random strings a Python regex matches, from its syntax tree (the checker's test set)
    nlrx          the NL-RX regex checker (the reference's synth / turk: the same language, exactly)
    latent        teacher-forced CE and JEPA metrics in the packed single pass
    run           loading a model, data-parallel evaluation, the table and JSON
"""
