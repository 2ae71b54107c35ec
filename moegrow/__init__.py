"""moegrow: grow Mixture-of-Experts checkpoints in depth and width (arXiv 2510.08008).

Depth by interposition (each layer copied right after itself), width by expert duplication with
Gaussian noise on the copies. Streams safetensors shards; writes a checkpoint transformers loads.
"""

__version__ = "0.1.0"
