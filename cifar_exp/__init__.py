"""cifar_exp: a scratch CNN against a fine-tuned ResNet-18 on CIFAR-100, tracked in MLflow."""

__version__ = "0.1.0"
