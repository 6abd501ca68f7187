"""Image folders and scoring, below every command that reads images (finetune, evaluate, analyze, fold, compare):
``folders`` finds the classes and images of DATA, splits them, and loads and augments them; ``scoring`` chooses
the images a model is scored on and computes top-1, top-5, loss and the confusion matrix."""

AUGMENTATIONS = ("auto", "none", "light", "imagenet")  # here, so that the CLI's flags need no torch
