"""Training recipes, each one file read top to bottom: dadpo (daDPO from the cache) and sft (dSFT)."""
