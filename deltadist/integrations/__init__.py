"""deltadist inside other tools' loops: the transformers Trainer (:class:`DeltaTrainer`) and the
meta-device setup order for sharded runs (:func:`prepare_model`)."""
