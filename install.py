"""Run by the WebUI at launch: installs what LoRAtorio needs and the WebUI's environment lacks.

Never installs or upgrades torch (the WebUI's own build must stay).
"""

import launch

REQUIREMENTS = {"safetensors": "safetensors>=0.4"}

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{requirement}"', f"LoRAtorio requirement: {requirement}")
