"""One adapter per model family, registered by ``model_type``: everything the engine needs to know about a model.

The engine never reaches into a model by hard-coded attribute paths. It asks the family's adapter for:

- the model class to load, and the attention implementation the model is run with natively (Gemma 2 needs
  ``eager``: transformers' SDPA path drops its attention soft-capping);
- the decoder layers, the final norm, the head, and the logits (``logits``: norm, head and soft-capping);
- the inputs of layer 0 for one sequence (``layer_inputs``: embeddings with the visual features placed, rotary
  position ids) and what the model adds along the way (DeepStack features);
- the rotary embedding each layer gets (``position_embeddings``: Gemma 3 has a local and a global one);
- the attention mask each layer gets (``layer_masks``, from the layer types the family's modeling code follows and,
  for Gemma 3, the image positions: its tokens of one image attend to each other both ways);
- for vision-language families (``takes_images``), the image markup of a raw prompt and the geometry that maps
  each vision token to its box of original-image pixels (``token_cells``);
- which stages (``--stage``) it supports.

Adding a family is one file that defines a subclass of ``base.DecoderAdapter`` decorated with ``@register``,
imported in this module, and one row in the test table (tests/test_families.py). A ``model_type`` with no adapter
is refused with one line naming the supported families.
"""

from .base import (LAYER_MASKS, REGISTRY, TOKEN_TYPES, DecoderAdapter, LayerInputs,  # noqa: F401  (the package's API)
                   adapter_for, all_full, declared_types, family_class, register, supported)
from . import gemma, gemma3_vl, llava, llava_next, llava_onevision, qwen_vl, text  # noqa: F401  (each registers)
