"""pssm inference: Kalman kernels, guide families, objectives and training."""
