"""``deltadist train``: delta-tune a pretrained encoder on a built-in text-classification task.

``config`` (typed YAML config), ``data`` (the generated data set), ``model`` (encoder + head),
``engine`` (where it runs), ``loop`` (the job), ``report`` (the summary). Importing this package
imports nothing heavy; import the submodules.
"""
