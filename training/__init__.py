"""Training jobs: a folder of labelled scans in, versioned verified model artifacts out."""
