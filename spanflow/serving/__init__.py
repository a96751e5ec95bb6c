"""The registered model's pyfunc."""
