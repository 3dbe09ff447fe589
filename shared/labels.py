"""Class names and task names: the one place they are spelled."""

CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
"""Output order of every classifier this project trains and serves."""

LESION_CLASSES: frozenset[str] = frozenset({"benign", "malignant"})
"""Findings for which /diagnose goes on to segment."""

TASK_CLASSIFICATION = "classification"
TASK_SEGMENTATION = "segmentation"
TASK_DIAGNOSIS = "diagnosis"
"""One joint artifact that outputs both the class logits and the lesion mask logits."""
TASKS: tuple[str, ...] = (TASK_CLASSIFICATION, TASK_SEGMENTATION, TASK_DIAGNOSIS)
