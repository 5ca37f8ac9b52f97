"""The host side of LoRAtorio: the A1111 and Forge modules the thin entry script in ``scripts/``
loads, and the ComfyUI nodes (``comfyui``, ``comfyui_nodes``) the root ``__init__.py`` loads.
Nothing here is imported by ``loratorio_core``."""
