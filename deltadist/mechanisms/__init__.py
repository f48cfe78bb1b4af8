"""How a delta changes a call, with hooks only: output hooks (parallel, after, before, span),
input rewriting (soft prompts), attention routing (prefixes) and row routing (mixed batches)."""
