"""``deltadist train``: delta-tune a transformers checkpoint on the user's rows (causal LM, seq2seq,
sequence classification), or the built-in MiniLM topic task.

``config`` (typed YAML config), ``text_data`` (rows -> token ids, read with ``datasets``),
``data`` (the built-in topic set), ``job_data`` (the job's splits), ``model`` (backbone for the
task), ``batching`` (global batches -> each rank's micro-batches), ``objectives`` (losses),
``schedule`` (learning rate), ``run_state`` (resumable checkpoints), ``loop`` (the job),
``report`` (the summary). Importing this package imports nothing heavy; import the submodules.
"""
