"""Training and evaluation: datasets, PEFT training, metrics, reports."""
