"""Run by the host when the extension is installed or started, with the host's own Python.

- A1111 / Forge run it with their ``launch`` module importable: it installs what LoRAtorio needs
  and the WebUI's environment lacks (safetensors).
- ComfyUI-Manager runs it with plain ``python install.py``: ComfyUI's own requirements already
  hold everything LoRAtorio imports (torch, safetensors, numpy, pillow), so nothing is installed.

Never installs or upgrades torch (the host's own build must stay).
"""

import importlib.util

REQUIREMENTS = {"safetensors": "safetensors>=0.4"}


def missing() -> dict:
    return {m: r for m, r in REQUIREMENTS.items() if importlib.util.find_spec(m) is None}


def main() -> None:
    try:
        import launch  # the WebUIs' installer helpers
    except ImportError:  # ComfyUI (Manager) or a plain Python: report, install nothing
        lacking = missing()
        if lacking:
            print("LoRAtorio needs " + ", ".join(lacking.values()) + ": pip install them into this Python")
        return
    for module, requirement in REQUIREMENTS.items():
        if not launch.is_installed(module):
            launch.run_pip(f'install "{requirement}"', f"LoRAtorio requirement: {requirement}")


if __name__ == "__main__":
    main()
