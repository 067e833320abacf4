"""Model zoo: the paper's architectures, model cards, the registry that loads models, and training."""
