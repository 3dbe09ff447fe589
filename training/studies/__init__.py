"""One-off studies: analyses run once to answer a question about a recipe or a model (its
calibration, its out-of-distribution check, its shortcuts, how recipes compare), apart from the
pipeline steps that train, export and publish. Their commands are `python -m training <study>`."""
