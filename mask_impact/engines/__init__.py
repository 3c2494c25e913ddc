"""Each stage's engines: a fast one and its oracle, a naive one (one forward of the whole model per knockout), with
one interface (``base_logprobs``, ``logprobs(row, units)``, ``first_affected``), and the stage's ``plan``.

    base.py        StagePlan: what a stage's sweep needs from its engine module
    decoder.py     attention knockouts in the decoder: FastEngine, NaiveEngine (the others run the decoder
                   through FastEngine)
    pixels.py      occlusion of the image the model sees
    vit.py         attention knockouts between an image's patches in the vision encoder
    deepstack.py   DeepStack features or the main embedding removed
"""
