"""``deltadist train``: delta-tune a transformers checkpoint on the user's rows (causal LM, seq2seq,
sequence classification), or the built-in MiniLM topic task.

``config`` (typed YAML config), ``data_files`` (a split's rows, read with ``datasets``),
``text_data`` (rows -> token ids), ``data`` (the built-in topic set), ``job_data`` (the job's
splits), ``model`` (backbone for the task), ``batching`` (global batches -> each rank's
micro-batches), ``objectives`` (losses), ``schedule`` (learning rate), ``steps`` (an optimizer
step), ``evaluation`` (eval loss and accuracy), ``run_state`` (resumable checkpoints' files),
``checkpointing`` (saving, resuming), ``checks`` (output_dir, warm-up), ``metrics``
(metrics.json(l)), ``loop`` (the job), ``report`` (the summary). Importing this package imports
nothing heavy; import the submodules.
"""
