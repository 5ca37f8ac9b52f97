"""The WebUI side of LoRAtorio (A1111 and Forge): importable modules the thin entry script in
``scripts/`` loads. Nothing here is imported by ``loratorio_core``."""
