"""minbert: multitask fine-tuning of BERT encoders."""
