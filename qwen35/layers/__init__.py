"""Small nn.Modules that own parameters (norms, MLP, MoE), named as in the checkpoints."""
