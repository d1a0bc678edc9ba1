"""dadpo's command-line layer (installed as dadpo.cli): flags in, library calls out."""
