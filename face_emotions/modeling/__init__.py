"""Models: the architecture zoo (timm), the bundle format workers load, and evaluation metrics."""
