"""The versioned file formats (installed as dadpo.data_specs so the code validates against them)."""
