"""A synthetic ComposLoRA: a small text-to-image world, its model, LoRAs and detectors, all offline.

``world`` renders 32x32 scenes from specs and captions them, ``model`` holds the text encoder,
the space-to-depth "autoencoder", the noise schedule and the sampler (any ``LoRAtorioConfig``
mode), ``detectors`` judges generated images. The trained weights ship in ``weights/``.
"""
