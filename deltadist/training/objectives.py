"""Each task's loss: summed over what its mean averages (target tokens or rows), in float32."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deltadist.training.text_data import IGNORE_INDEX


def summed_loss(task: str, model: nn.Module, inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss summed over the batch's targets, predicted classes)``; the second is ``[rows]`` class
    indices for ``sequence_classification``, an empty tensor otherwise.

    ``inputs`` come from :class:`~deltadist.training.batching.Collator`. A causal LM predicts token
    ``t + 1`` at position ``t``, so logits and labels are shifted by one against each other.
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    output = model(**model_inputs)
    logits = getattr(output, "logits", output).float()  # TextClassifier returns the logits itself
    if task == "sequence_classification":
        return F.cross_entropy(logits, labels, reduction="sum"), logits.argmax(dim=-1)
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, torch.zeros(0, dtype=torch.long, device=loss.device)
