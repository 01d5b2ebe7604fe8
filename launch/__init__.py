"""Launch scripts: model factories, torchrun entry point, demo and network testbed."""
