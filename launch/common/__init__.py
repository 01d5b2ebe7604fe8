"""Training code shared by launch/train.py and launch/train_horovod.py: flags, models, the step loop."""
