"""Classifying images with a registered model: predictor, decode-ahead, dynamic batcher,
hot-reloading model holder and the chunk classifier behind every inference task.
"""
