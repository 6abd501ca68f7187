"""Fine-tuning SE models on an image folder: data, the training loop, distributed helpers, evaluation."""
