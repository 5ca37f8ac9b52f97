"""A second synthetic ComposLoRA, built to differ from the first where it matters for transfer.

A pixel-space model (24x24x3, no codec) with v-prediction on a cosine schedule, a text encoder with
one transformer layer (width 48: the words of a caption interact), and its own 11 concepts,
renderer, captions and detectors. ``world`` renders scenes and captions them, ``model`` holds the
text encoder, the UNet config and the schedule, ``detectors`` judges generated images,
``benchmark`` is the interface the quality benchmark runs (shared with ``loratorio_core.synthetic``).
The trained weights ship in ``weights/``.
"""
