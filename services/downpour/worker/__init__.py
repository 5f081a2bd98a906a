"""The model worker: one partition of one model replica running Downpour SGD."""
