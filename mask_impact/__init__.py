"""mask_impact: which input tokens does a model need, at which layers, to produce its answer?"""

__version__ = "0.2.0"
