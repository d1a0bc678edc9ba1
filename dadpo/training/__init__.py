"""The training machinery recipes drive: config (the generic flags), data (which rows each step
trains on), trainer (accelerate, the policy, the optimizer, the step), runlog, checkpoint, run_folder."""
