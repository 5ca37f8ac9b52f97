"""The parts of ComfyUI's ``comfy`` package the LoRAtorio nodes touch, faked from ComfyUI 0.8.0's
source (a test fixture, never shipped)."""
