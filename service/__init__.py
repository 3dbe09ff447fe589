"""The breast-ultrasound inference service (research use, not a medical device)."""
