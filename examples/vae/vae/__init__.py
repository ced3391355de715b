"""A variational autoencoder that computes its own loss (reconstruction + KL): dtrain calls its
training_step and validation_step instead of a task's loss."""
