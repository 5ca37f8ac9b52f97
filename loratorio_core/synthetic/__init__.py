"""A synthetic ComposLoRA: a small text-to-image world, its model, LoRAs and detectors, all offline.

``world`` renders 32x32 scenes from specs and captions them, ``model`` holds the text encoder,
the space-to-depth "autoencoder", the noise schedule and the sampler (any ``LoRAtorioConfig``
mode), ``detectors`` judges generated images. The trained weights ship in ``weights/``.

What the second synthetic benchmark (``loratorio_core.pixelworld``) shares with this one lives here
too: ``sampler`` (the one sampler both use), ``composition`` (sets, split, jobs, detector
validation, gt-rmse), ``checkpoint`` (weights I/O, kohya tag counts) and ``interface`` (the
``benchmark`` module's functions, written once).
"""
